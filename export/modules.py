"""The torch modules that become the ONNX graphs: each wraps one pipeline component so that its
graph has plain tensor inputs and outputs under the names the runtime expects."""

from __future__ import annotations

import copy

import torch


class ClipSkipTextEncoder(torch.nn.Module):
    """CLIP text model that stops early, with one output per clip skip: clip skip N (A1111's
    counting, 1 = last layer) is the hidden state N layers from the end passed through the final
    layer norm, which is what A1111 and diffusers' `clip_skip=N-1` compute. The outputs share the
    layers up to the smallest clip skip's point (one more output costs one final layer norm); the
    layers after it are dropped, so they are neither in the graph nor run."""

    def __init__(self, text_encoder: torch.nn.Module, clip_skips: tuple[int, ...]) -> None:
        super().__init__()
        layers = text_encoder.config.num_hidden_layers
        for clip_skip in clip_skips:
            if not 1 <= clip_skip < layers:
                raise ValueError(f"clip skip must be between 1 and {layers - 1} for a {layers}-layer text encoder")
        self.model = copy.deepcopy(text_encoder)
        keep = layers - (min(clip_skips) - 1)
        # hidden_states[-k] of the shortened model for each clip skip (its last is the smallest's)
        self.picks = [clip_skip - min(clip_skips) + 1 for clip_skip in clip_skips]
        encoder = text_model(self.model).encoder
        encoder.layers = encoder.layers[:keep]
        self.model.config.num_hidden_layers = keep
        embeddings = text_model(self.model).embeddings
        self.tokens = embeddings.token_embedding = ExtendedTokenEmbedding(embeddings.token_embedding)

    def forward(self, input_ids: torch.Tensor, extra_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.tokens.extra = extra_embeddings
        output = self.model(input_ids=input_ids, output_hidden_states=len(self.picks) > 1)
        if len(self.picks) == 1:
            return (output.last_hidden_state,)
        norm = text_model(self.model).final_layer_norm
        return tuple(norm(output.hidden_states[-pick]) for pick in self.picks)


class ExtendedTokenEmbedding(torch.nn.Module):
    """CLIP's token embedding, where ids from vocab_size on pick rows of `extra` (vectors that are
    not in the vocabulary: textual-inversion embeddings). Two gathers and a select rather than a
    concatenated table, so a run never copies the 49408-row table."""

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        super().__init__()
        self.weight = embedding.weight
        self.extra: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.weight.shape[0]
        base = torch.nn.functional.embedding(input_ids.clamp(max=vocab - 1), self.weight)
        extra = torch.nn.functional.embedding((input_ids - vocab).clamp(min=0), self.extra.to(self.weight.dtype))
        return torch.where((input_ids >= vocab).unsqueeze(-1), extra, base)


def text_model(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The module holding embeddings/encoder/final_layer_norm: transformers 4 nests it under
    `.text_model`, transformers 5 does not."""
    return getattr(text_encoder, "text_model", text_encoder)


@torch.no_grad()
def clip_skip_reference(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """The reference the graph is validated against: the full model's hidden_states[-clip_skip]
    through the final layer norm (for clip skip 1 that is last_hidden_state)."""
    output = text_encoder(input_ids=input_ids, output_hidden_states=True)
    return text_model(text_encoder).final_layer_norm(output.hidden_states[-clip_skip])


class UNetForOnnx(torch.nn.Module):
    """noise prediction from (sample, timestep per batch item, text embeddings of any length, and
    the ControlNet residuals: one per skip connection, then the middle block's). The residuals are
    added as diffusers adds a ControlNet's (down_block_additional_residuals /
    mid_block_additional_residual); zeros give the plain UNet, so one graph serves both."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *residuals: torch.Tensor,
    ) -> torch.Tensor:
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class ControlNetForOnnx(torch.nn.Module):
    """A ControlNet's residuals at conditioning scale 1 (the runtime scales them per unit) from the
    UNet's inputs and the control image (batch, channels, height, width) in [0, 1] at pixel size,
    one output per UNet residual input, in that order. `pooled` (A1111's global_average_pooling,
    the shuffle models): each residual is its spatial mean, broadcast back to the full size so that
    every ControlNet's outputs have the shapes of the UNet's inputs."""

    def __init__(self, controlnet: torch.nn.Module, pooled: bool = False) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.pooled = pooled

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, return_dict=False
        )
        residuals = (*down, mid)
        if self.pooled:
            residuals = tuple(item.mean(dim=(2, 3), keepdim=True).expand_as(item) for item in residuals)
        return residuals


class VaeDecoder(torch.nn.Module):
    """Scaled latents (already divided by the scaling factor) to images in [-1, 1] (unclamped)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """Images in [-1, 1] to the latent distribution's parameters (mean and log-variance stacked on
    the channel axis, as diffusers' DiagonalGaussianDistribution holds them), so the caller picks
    the mean or samples with its own generator."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0].parameters
