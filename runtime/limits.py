"""Default limits shared by the library, the CLI and the server, in a module that imports nothing
(the CLI reads them before it loads onnxruntime)."""

MAX_PIXELS = 1024 * 1024  # width * height of one image: 1024x1024 or 512x2048; None (library) lifts it
LORA_CACHE_MB = 4096  # LoRA-patched sessions kept, by the resident memory building them took
MAX_CONTROLNET_UNITS = 3  # enabled ControlNet units per request: the extension's default unit count
