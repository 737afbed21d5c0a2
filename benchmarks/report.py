"""The table that benchmarks/run.py prints from its results (each ratio names what it was compared with)."""
from __future__ import annotations


def _training_rows(results) -> list[tuple[str, str]]:
    rows = []
    for when, peak in results.get("peak_gflops", {}).items():
        rows.append((f"matmul peak ({when} training)", f"bf16 {peak['bfloat16']:.0f} GFLOP/s, "
                                                       f"float32 {peak['float32']:.0f} GFLOP/s"))
    t = results.get("training")
    if t:
        rows.append((f"training {t['model']} {t['size']}x{t['size']} batch {t['batch_size']} {t['precision']} "
                     f"(library loop)", f"{t['images_per_s']:.1f} img/s median of {len(t['runs'])} "
                                        f"(min {min(t['runs']):.1f}, max {max(t['runs']):.1f}, "
                                        f"spread {t['spread']:.0%})"))
        if "mfu_of_bfloat16_peak" in t:
            flops = results["model_flops_per_image"]["training"]
            rows.append(("model FLOP utilisation", f"{t['achieved_gflops']:.0f} GFLOP/s ({flops / 1e9:.2f} GFLOP/image)"
                                                   f" = {t['mfu_of_bfloat16_peak']:.0%} of the bf16 peak, "
                                                   f"{t['mfu_of_float32_peak']:.0%} of the float32 peak"))
    e = results.get("epochs")
    if e:
        rows.append(("first epoch / later epoch",
                     f"{e['first_epoch_seconds']:.0f} s / {e['later_epoch_seconds']:.0f} s"))
    if "peak_rss_mb_after_training" in results:
        rows.append(("peak resident memory (training)", f"{results['peak_rss_mb_after_training']:.0f} MB"))
    return rows


def _inference_rows(results) -> list[tuple[str, str]]:
    rows = []
    for key in ("torch", "onnx", "torch_bf16", "onnx_int8", "openvino_int8"):
        i = results.get(f"inference_{key}")
        if i and "images_per_s" in i:
            rows.append((f"inference batch {i['batch_size']}, {key} engine",
                         f"{i['images_per_s']:.1f} img/s; one image p50 {i['single_image_ms_p50']:.1f} ms, "
                         f"p95 {i['single_image_ms_p95']:.1f} ms"))
    onnx = results.get("inference_onnx", {})
    for key in ("onnx_int8", "openvino_int8"):
        int8 = results.get(f"inference_{key}", {})
        if "images_per_s" in onnx and "images_per_s" in int8:
            rows.append((f"{key} / float32 ONNX (same run)", f"x{int8['images_per_s'] / onnx['images_per_s']:.2f}"))
    rows += _alternating_rows("seed model", results.get("inference_alternating", {}))
    rows += _alternating_rows("trained checkpoint", (results.get("int8_trained") or {}).get("alternating", {}))
    trained = results.get("int8_trained")
    if trained:
        for key, agreement in (("onnx_int8", trained), ("openvino_int8", trained.get("openvino_int8", {}))):
            engines = trained["engines"]
            if "same_label" not in agreement or "images_per_s" not in engines.get(key, {}):
                continue
            ratio = engines[key]["images_per_s"] / engines["onnx"]["images_per_s"]
            rows.append((f"{key} on the trained checkpoint's test split",
                         f"ROC AUC {agreement['roc_auc_int8']:.4f} vs float32 {agreement['roc_auc_float32']:.4f}; "
                         f"same label {agreement['same_label']:.1%}, same OOD flag "
                         f"{agreement.get('same_ood_flag', 0):.1%} of {agreement['images']}; x{ratio:.2f} the float32 "
                         f"ONNX img/s, one image p50 {engines[key]['single_image_ms_p50']:.1f} ms vs "
                         f"{engines['onnx']['single_image_ms_p50']:.1f} ms"))
    return rows


def _alternating_rows(model: str, measured: dict) -> list[tuple[str, str]]:
    rows = []
    for engine, pairs in measured.items():
        if "median_ratio" not in pairs:
            rows.append((f"{engine} / float32 ONNX, {model}, alternating processes", pairs.get("skipped", "?")))
            continue
        ratios = ", ".join(f"x{r:.2f}" for r in pairs["pair_ratios"])
        speeds = pairs["images_per_s"]
        rows.append((f"{engine} / float32 ONNX, {model}, alternating processes",
                     f"x{pairs['median_ratio']:.2f} (median of pairs {ratios}; "
                     f"{min(speeds[engine]):.0f}-{max(speeds[engine]):.0f} vs "
                     f"{min(speeds['onnx']):.0f}-{max(speeds['onnx']):.0f} img/s)"))
    return rows


def _other_rows(results) -> list[tuple[str, str]]:
    rows = []
    if "server" in results:
        s = results["server"]
        rows.append(("server /predict, 16 concurrent", f"{s['requests_per_s']:.1f} req/s, p50 {s['p50_ms']:.0f} ms, "
                                                       f"p95 {s['p95_ms']:.0f} ms"))
    for row in results.get("streaming_memory", []):
        rows.append((f"streaming {row['images']:,} cached images", f"anonymous {row['anon_mb_after']:.0f} MB"))
    if "distributed" in results:
        runs = results["distributed"]["runs"]
        rows.append(("data parallel 1 vs 2 processes (Gloo)", f"{runs[0]['images_per_s']:.1f} vs "
                                                               f"{runs[1]['images_per_s']:.1f} img/s"))
    return rows


def _keras_rows(results) -> list[tuple[str, str]]:
    k = results.get("keras")
    if not k:
        return []
    if "skipped" in k:
        return [("Keras peers", k["skipped"])]
    tutorial = k["tutorial"]
    onnx = tutorial.get("ratio_inference_onnx_to_keras")  # absent when inference was not measured (--only)
    rows = [("Keras tutorial pipeline (ImageDataGenerator)",
             f"train {tutorial['training_images_per_s']:.1f} img/s, predict {tutorial['predict_images_per_s']:.1f} "
             f"img/s; ours x{tutorial['ratio_training_ours_to_keras']:.2f} in training"
             + (f", onnx engine x{onnx:.2f} in inference" if onnx is not None else ""))]
    peer = k.get("tfdata_bf16")
    if peer:
        rows.append(("Keras tf.data + cache + mixed_bfloat16", f"train {peer['keras_images_per_s_median']:.1f} img/s "
                     f"vs ours {peer['ours_images_per_s_median']:.1f}: ours x{peer['ratio_median']:.2f} (median of "
                     f"{len(peer['pairs'])} interleaved pairs: "
                     + ", ".join(f"x{p['ratio']:.2f}" for p in peer["pairs"]) + ")"))
    return rows


def _time_to_model_rows(results) -> list[tuple[str, str]]:
    t = results.get("time_to_model")
    if not t:
        return []
    return [(f"--preset {r['preset']}: raw images to a checkpoint",
             f"{r['checkpoint_seconds']:.1f} s ({'within' if r['within_time'] else 'over'} {t['target_seconds']} s), "
             f"val AUC {r['best_val_auc']:.4f} ({'within' if r['within_auc'] else 'outside'} {t['tolerance']} of "
             f"best's {t['reference_val_auc']})") for r in t["runs"]]


def print_table(results):
    rows = [("device", f"{results['device']} ({results['threads']} threads, {results['cpu']}); load average "
                       f"{results['load_average_start']:.1f} at start, "
                       f"{results.get('load_average_end', 0):.1f} at end")]
    if "cache" in results:
        c = results["cache"]
        rows.append(("cache build (decode, all cores)", f"{c['build_seconds']:.1f} s for {c['images']} images "
                                                         f"({c['decode_images_per_s']:.0f} img/s)"))
    if "data_pipeline" in results:
        rate = results["data_pipeline"]["images_per_s"]
        training = results.get("training", {}).get("images_per_s")
        rows.append(("data pipeline alone (cache + augmentation)",
                     f"{rate:.0f} img/s" + (f" ({rate / training:.0f}x training)" if training else "")))
    rows += (_training_rows(results) + _inference_rows(results) + _other_rows(results) + _keras_rows(results)
             + _time_to_model_rows(results))
    width = max(len(r[0]) for r in rows) + 2
    print("\n".join(f"{name:<{width}}{value}" for name, value in rows))
