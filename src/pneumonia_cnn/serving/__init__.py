"""Floor 3: the HTTP API and web page. Imports inference, never training."""
