"""Typed projector configs: the `model.projector` section of a trial config.

One pydantic model per projector type, discriminated on `type`. Defaults live here and only here;
cross-field rules raise with the field named, they never rewrite the user's values. Dimensions that
default to another module's size (`hidden_dim` = LLM dim, QFormer `hidden_size` = encoder dim) are
left `None` here and resolved by the `resolved_*` helpers at build time, when those sizes are known.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator


def _not_a_bool(value: object) -> object:
    # pydantic's lax mode reads True as 1; in YAML `stride: yes` is a typo, not a stride.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


PositiveInt = Annotated[int, BeforeValidator(_not_a_bool), Field(gt=0)]
NonNegativeFloat = Annotated[float, BeforeValidator(_not_a_bool), Field(ge=0.0)]


class _ProjectorBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    output_norm: bool = False
    """Add an RMSNorm on the projector output, so types can be compared on equal footing."""


class MLPConfig(_ProjectorBase):
    """Frame stacking by `stride`, then Linear → RMSNorm → GELU → Linear (GLM-ASR style)."""

    type: Literal["mlp"] = "mlp"
    stride: PositiveInt = 4
    """k: adjacent encoder frames concatenated into one output frame."""
    hidden_dim: PositiveInt | None = None
    """Width of the MLP's hidden layer; default: the LLM's embedding dim."""

    def resolved_hidden_dim(self, llm_dim: int) -> int:
        return self.hidden_dim or llm_dim


class MOSAConfig(_ProjectorBase):
    """MOSA: two stride-2 convs (×4 downsampling), a ReLU router, dense softmax mix of adapters."""

    type: Literal["mosa"] = "mosa"
    num_experts: PositiveInt = 4
    adapter_hidden_dim: PositiveInt = 4096
    """Hidden width of each 2-layer GELU adapter."""
    router_hidden_dim: PositiveInt = 512


class MoEConfig(_ProjectorBase):
    """Frame stacking, then a shared expert plus sparse top-k routed experts (aux + z loss)."""

    type: Literal["moe"] = "moe"
    stride: PositiveInt = 4
    hidden_dim: PositiveInt | None = None
    """Hidden width of every expert; default: the LLM's embedding dim."""
    num_experts: PositiveInt = 4
    top_k: PositiveInt = 2
    """Experts each token is routed to (≤ num_experts)."""
    aux_loss_coef: NonNegativeFloat = 0.01
    """Weight of the load-balancing loss."""
    z_loss_coef: NonNegativeFloat = 1e-4
    """Weight of the router z-loss (logsumexp² of the router logits)."""
    jitter_noise: Annotated[float, BeforeValidator(_not_a_bool), Field(ge=0.0, lt=1.0)] = 0.01
    """Multiplicative uniform noise (1 ± ε) on router logits, training only."""

    def resolved_hidden_dim(self, llm_dim: int) -> int:
        return self.hidden_dim or llm_dim

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


class QFormerConfig(_ProjectorBase):
    """BLIP-2 QFormer over fixed windows: window_size // downsample_rate queries per window."""

    type: Literal["qformer"] = "qformer"
    window_size: PositiveInt = 15
    downsample_rate: PositiveInt = 5
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 16
    hidden_size: PositiveInt | None = None
    """QFormer width; default: the encoder's dim."""
    intermediate_size: PositiveInt | None = None
    """QFormer feed-forward width; default: 4 × hidden_size."""

    @model_validator(mode="after")
    def _shapes_divide(self) -> QFormerConfig:
        if self.window_size % self.downsample_rate:
            raise ValueError(
                f"downsample_rate ({self.downsample_rate}) must divide "
                f"window_size ({self.window_size})"
            )
        if self.hidden_size is not None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        return self

    @property
    def num_queries(self) -> int:
        """Learned queries per window: output frames per `window_size` input frames."""
        return self.window_size // self.downsample_rate

    def resolved_hidden_size(self, encoder_dim: int) -> int:
        """`hidden_size`, or the encoder's dim; raises naming `num_heads` if they do not divide."""
        hidden = self.hidden_size or encoder_dim
        if hidden % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({hidden}"
                f"{'' if self.hidden_size else ', the default: the encoder dim'})"
            )
        return hidden

    def resolved_intermediate_size(self, encoder_dim: int) -> int:
        return self.intermediate_size or 4 * self.resolved_hidden_size(encoder_dim)


ProjectorConfig = Annotated[
    MLPConfig | MOSAConfig | MoEConfig | QFormerConfig, Field(discriminator="type")
]
"""Any projector config; pydantic picks the class from `type`."""

PROJECTOR_TYPES: tuple[str, ...] = ("mlp", "mosa", "moe", "qformer")

_ADAPTER: TypeAdapter[MLPConfig | MOSAConfig | MoEConfig | QFormerConfig] = TypeAdapter(
    ProjectorConfig
)


def parse_projector_config(
    cfg: dict | MLPConfig | MOSAConfig | MoEConfig | QFormerConfig,
) -> MLPConfig | MOSAConfig | MoEConfig | QFormerConfig:
    """A typed projector config from a mapping (validated) or a typed config (returned as is)."""
    if isinstance(cfg, _ProjectorBase):
        return cfg
    return _ADAPTER.validate_python(cfg)
