"""CLIP's text transformer (the SD text encoder) in Flax linen.

Numerics follow transformers' PyTorch ``CLIPTextModel``; the parameter tree is the one of the former
``transformers.FlaxCLIPTextModel``: ``text_model/embeddings/{token,position}_embedding/embedding``,
``text_model/encoder/layers/<i>/{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/fc1, mlp/fc2, layer_norm2}``,
``text_model/final_layer_norm``.

``input_ids [B, L]`` (L <= max_position_embeddings, 77 for SD) -> ``last_hidden_state [B, L, D]`` (after the final
layer norm), ``pooled [B, D]`` (the last hidden state at the end-of-text token: the first position holding
``eos_token_id``, or the argmax of the ids for configs whose ``eos_token_id`` is the legacy 2, as transformers
does), and with ``output_hidden_states`` the embeddings plus every layer's output (before the final norm).

Penultimate layer (SD 2.x / "clip skip"): :func:`text_embeddings` with ``skip_layers=1`` returns
``final_layer_norm(hidden_states[-2])`` as diffusers' ``clip_skip``. The SD 2.x text encoders on the Hub already
ship with 23 of OpenCLIP's 24 layers, so their last hidden state *is* the penultimate layer and the default
``skip_layers=0`` is right for them.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfd_jax.models.attention import check_implementation, dot_product_attention, merge_heads, split_heads
from sfd_jax.models.hf_config import UnsupportedConfigError, parse_config
from sfd_jax.models.sd_unet import layer_norm

Dtype = Any
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, D], after the final layer norm
    pooled: jax.Array  # [B, D], last_hidden_state at the end-of-text token
    hidden_states: tuple | None  # embeddings + each layer's output (before the final norm), when asked for
    conditioning: jax.Array  # final_layer_norm(hidden_states[-(skip_layers + 1)]); = last_hidden_state for 0


class CLIPAttention(nn.Module):
    hidden_size: int
    heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, mask=None):
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (split_heads(dense(n)(x), self.heads) for n in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=self.attention_impl)
        return dense("out_proj")(merge_heads(out))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    heads: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, mask=None):
        h = layer_norm(self.eps, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.hidden_size, self.heads, self.dtype, self.attention_impl, name="self_attn")(h, mask)
        h = layer_norm(self.eps, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class _LayerCollection(nn.Module):
    """Holds the layers under the names '0', '1', ... (the Flax CLIP tree's ``encoder/layers/<i>``)."""
    num_layers: int
    layer_kwargs: dict

    @nn.compact
    def __call__(self, x, mask=None):
        states = (x,)
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(**self.layer_kwargs, name=str(i))(x, mask)
            states += (x,)
        return states


class _Encoder(nn.Module):
    num_layers: int
    layer_kwargs: dict

    @nn.compact
    def __call__(self, x, mask=None):
        return _LayerCollection(self.num_layers, self.layer_kwargs, name="layers")(x, mask)


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int

    @nn.compact
    def __call__(self, input_ids, inputs_embeds=None):
        """``inputs_embeds`` [B, L, D] (optional): token embeddings used in place of the table's rows of
        ``input_ids`` (the position embeddings are added either way)."""
        embed = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding")
        tok = embed(input_ids) if inputs_embeds is None else jnp.asarray(inputs_embeds)
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, name="position_embedding")(
            jnp.arange(input_ids.shape[1]))
        return tok + pos[None]


class CLIPTextTransformer(nn.Module):
    """The text tower (the module under ``text_model``). Defaults are CLIP ViT-L/14's (SD 1.x)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False,
                 skip_layers: int = 0, inputs_embeds=None) -> CLIPTextOutput:
        """input_ids: int [B, L]; attention_mask: optional [B, L] (1 = real token; SD pipelines pass none);
        inputs_embeds: optional float [B, L, D] token embeddings replacing the table lookup of ``input_ids``
        (``input_ids`` still locate the end-of-text token for ``pooled``)."""
        check_implementation(self.attention_impl)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        input_ids = jnp.asarray(input_ids).astype(jnp.int32)
        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                               name="embeddings")(input_ids, inputs_embeds).astype(self.dtype)
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        layer_kwargs = dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                            heads=self.num_attention_heads, hidden_act=self.hidden_act, eps=self.layer_norm_eps,
                            dtype=self.dtype, attention_impl=self.attention_impl)
        states = _Encoder(self.num_hidden_layers, layer_kwargs, name="encoder")(x, mask)
        final_norm = layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")
        last = final_norm(states[-1])
        if self.eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # first occurrence of eos_token_id (padding may repeat it)
            eos_pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos_pos]
        conditioning = final_norm(states[-1 - skip_layers]) if skip_layers else last
        return CLIPTextOutput(last, pooled, states if output_hidden_states else None, conditioning)


class CLIPTextModel(nn.Module):
    """``transformers.CLIPTextModel``'s Flax layout: the transformer under the ``text_model`` scope."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    CONFIG_FIELDS = {k: k for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")}
    CONFIG_OFF_VALUES = {"model_type": ("clip_text_model",)}
    # training-only, CLIP-projection and bookkeeping keys: they do not change this module's forward pass
    CONFIG_INFORMATIONAL = (
        "architectures", "attention_dropout", "dropout", "initializer_factor", "initializer_range",
        "projection_dim", "bos_token_id", "pad_token_id", "dtype", "torch_dtype", "transformers_version",
        "output_attentions", "output_hidden_states", "return_dict", "use_cache", "is_decoder", "is_encoder_decoder",
        "tie_word_embeddings", "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "name_or_path",
        "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
        "finetuning_task", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
        "pruned_heads", "torchscript", "use_bfloat16", "typical_p", "top_k", "top_p", "temperature",
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
        "diversity_penalty", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "_attn_implementation")

    @classmethod
    def from_config(cls, config: dict, *, what: str = "text_encoder/config.json", **kwargs) -> "CLIPTextModel":
        fields = parse_config(config, what=what, fields=cls.CONFIG_FIELDS, off_values=cls.CONFIG_OFF_VALUES,
                              informational=cls.CONFIG_INFORMATIONAL)
        if fields.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise UnsupportedConfigError(f"{what}: unsupported config key 'hidden_act' = {fields['hidden_act']!r} "
                             f"(sfd_jax implements {', '.join(ACTIVATIONS)})")
        return cls(**fields, **kwargs)

    def setup(self):
        self.text_model = CLIPTextTransformer(
            self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
            self.num_attention_heads, self.max_position_embeddings, self.hidden_act, self.layer_norm_eps,
            self.eos_token_id, self.dtype, self.attention_impl)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False,
                 skip_layers: int = 0, inputs_embeds=None) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, output_hidden_states, skip_layers, inputs_embeds)

    def init_params(self, rng: jax.Array):
        return self.init(rng, jnp.zeros((1, self.max_position_embeddings), jnp.int32))["params"]


def text_embeddings(model: CLIPTextModel, params, input_ids, skip_layers: int = 0) -> jax.Array:
    """The UNet's ``encoder_hidden_states`` [B, L, D], float32: the last hidden state (``skip_layers=0``), or
    ``final_layer_norm(hidden_states[-(skip_layers + 1)])`` as diffusers' ``clip_skip``."""
    out = model.apply({"params": params}, input_ids, skip_layers=skip_layers)
    return out.conditioning.astype(jnp.float32)


def token_embedding_table(params) -> jax.Array:
    """The token embedding table [vocab_size, D] of a :class:`CLIPTextModel`'s ``params``."""
    return params["text_model"]["embeddings"]["token_embedding"]["embedding"]


def text_embeddings_from_tokens(model: CLIPTextModel, params, input_ids, token_embeds,
                                skip_layers: int = 0) -> jax.Array:
    """As :func:`text_embeddings`, from token embeddings ``token_embeds`` [B, L, D] (e.g. the table's rows of
    ``input_ids`` plus a change, or a learned token in place of a placeholder) instead of the table lookup;
    ``input_ids`` [B, L] still locate the end-of-text token. Differentiable in ``token_embeds``."""
    out = model.apply({"params": params}, input_ids, skip_layers=skip_layers, inputs_embeds=token_embeds)
    return out.conditioning.astype(jnp.float32)
