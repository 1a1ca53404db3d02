"""The exported model on disk and in memory: the folder and its manifest, ONNX Runtime and OpenVINO
sessions, and what is patched into them at run time (added VAEs, LoRAs, safetensors reading)."""
