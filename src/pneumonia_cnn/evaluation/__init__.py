"""Floor 3: metrics, thresholds, calibration, report, comparison and stress tests."""
