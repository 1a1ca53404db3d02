"""acertain-onnx runtime: Stable Diffusion 1.x text-to-image on ONNX Runtime, without torch.

from runtime import Pipeline
pipe = Pipeline.from_pretrained("acertainthing-onnx")
out = pipe("masterpiece, best quality, 1girl", negative_prompt="lowres", seed=114514)
out.images[0].save("out.png")
"""

__version__ = "0.1.0"

from .errors import GenerationCancelled, InvalidRequestError, ModelFolderError, UserError
from .pipeline import Pipeline, PipelineOutput

__all__ = [
    "GenerationCancelled",
    "InvalidRequestError",
    "ModelFolderError",
    "Pipeline",
    "PipelineOutput",
    "UserError",
    "__version__",
]
