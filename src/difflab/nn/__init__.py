"""Plain nn.Modules (no Lightning): the UNet and the DiT, their embeddings and attention blocks."""

from difflab.nn.attention import Attention, SelfAttentionBlock, TransformerBlock
from difflab.nn.autoencoder import Autoencoder, DiagonalGaussian
from difflab.nn.discriminator import PatchDiscriminator
from difflab.nn.dit import DiT, DiTBlock
from difflab.nn.embeddings import (
    TIME_EMBEDDINGS,
    ClassEmbedding,
    LearnedTimeEmbedding,
    SinusoidalMLPTimeEmbedding,
    SinusoidalTimeEmbedding,
    sinusoidal_embedding,
)
from difflab.nn.unet import TIME_INJECTIONS, ResBlock, UNet

__all__ = [
    "TIME_EMBEDDINGS", "TIME_INJECTIONS", "Attention", "Autoencoder", "ClassEmbedding", "DiT", "DiTBlock",
    "DiagonalGaussian", "LearnedTimeEmbedding", "PatchDiscriminator", "ResBlock", "SelfAttentionBlock",
    "SinusoidalMLPTimeEmbedding", "SinusoidalTimeEmbedding", "TransformerBlock", "UNet", "sinusoidal_embedding",
]
