r"""The DDPM UNet and the SFD / pretraining iterations in PyTorch, for ``python -m sfd_jax.bench --compare=torch``.

The model is the class-conditional UNet of the original code (NCHW, the original ``state_dict`` names), the same
architecture as :class:`sfd_jax.models.ddpm_unet.ConditionalUNet`; the parity tests use it too (through
``tests/torch_reference.py``). Deliberate difference from the original: each ResnetBlock's class-embedding width is
4*ch (the original hard-codes 512, so only ch=128 runs); at ch=128 the two agree exactly.

The iterations are written the way the original PyTorch training code runs them:

* SFD (:class:`TorchSFDIteration`): A. fake-score update on one-step generator samples drawn without gradient
  (generator in eval mode), ε-MSE on the remain + forget batches, ``clip_grad_value_``, Adam (β1 = 0);
  B. generator update with the just-updated fake score (frozen, eval mode) and the teacher (frozen, eval mode),
  generator dropout on, the SiD loss on remain + forget batches (teacher at the override labels on the forget
  part), ``clip_grad_value_``, Adam (β1 = 0), EMA. Remain and forget passes run as one batch of 2B when
  ``distill.fused`` (as :mod:`sfd_jax.ddpm.steps` does), else as separate network calls.
* pretraining (:class:`TorchPretrainIteration`): antithetic t, label dropout, ε-MSE, ``clip_grad_norm_``, Adam,
  EMA.

Only torch and numpy are needed; nothing here imports JAX.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps=1e-6, affine)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, tensor2tensor style.  t: [B] (float, may be non-integer) -> [B, dim].

    half = dim // 2; freq_k = exp(-k * ln(10000) / (half - 1)); emb = [sin(t*freq), cos(t*freq)]
    (sin first); an odd dim is zero-padded by one column.
    """
    assert t.ndim == 1, "timesteps must be a 1-D tensor"
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)  # [half]
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, 2*half]
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class _EmbedMLP(nn.Module):
    """Linear(in -> D), swish, Linear(D -> D); no final activation.  Names: dense.0, dense.1."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, D]
        return self.dense[1](swish(self.dense[0](x)))


class ResnetBlock(nn.Module):
    """x: [B, Cin, H, W], temb/cemb: [B, D] -> [B, Cout, H, W].

    h = conv1(swish(GN1(x))) + temb_cemb_proj(swish(concat(temb, cemb)))[..., None, None]
    h = conv2(dropout(swish(GN2(h))));  return shortcut(x) + h  (1x1 nin_shortcut iff Cin != Cout).
    Parameter order: norm1, conv1, temb_cemb_proj, norm2, conv2, [nin_shortcut].
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float, temb_channels: int,
                 cemb_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # Columns [0, temb_channels) act on temb, the rest on cemb (temb comes first).
        self.temb_cemb_proj = nn.Linear(temb_channels + cemb_channels, out_channels)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cemb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # [B, Cout, H, W]
        emb = self.temb_cemb_proj(swish(torch.cat([temb, cemb], dim=-1)))  # [B, Cout]
        h = h + emb[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))  # [B, Cout, H, W]
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions.  x: [B, C, H, W] -> [B, C, H, W].

    Parameter order: norm, q, k, v, proj_out (1x1 convs with bias).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hgt * wid).permute(0, 2, 1)  # [B, N, C] (queries i)
        k = self.k(h).reshape(b, c, hgt * wid)  # [B, C, N] (keys j)
        v = self.v(h).reshape(b, c, hgt * wid)  # [B, C, N]
        w = torch.bmm(q, k) * (c ** -0.5)  # [B, N_i, N_j]
        w = torch.softmax(w, dim=2)  # softmax over key positions j
        out = torch.bmm(v, w.permute(0, 2, 1))  # [B, C, N_i]: out_i = sum_j w_ij v_j
        out = out.reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """[B, C, H, W] -> [B, C, H/2, W/2].

    with_conv: zero-pad right/bottom by 1, then 3x3 conv stride 2 pad 0 (name: conv);
    otherwise 2x2 average pooling (no parameters).
    """

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (left, right, top, bottom)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C, 2H, 2W]: nearest x2, then (with_conv) 3x3 conv pad 1 (name: conv)."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------


class RefConditionalModel(nn.Module):
    """Class-conditional DDPM UNet of the original release; predicts eps with the shape of x.

    forward(x [B, in_channels, R, R], t [B] float, c [B] long, mode) -> [B, out_ch, R, R].
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, in_channels: int, resolution: int,
                 n_classes: int, resamp_with_conv: bool = True, cond_drop_prob: float = 0.0):
        super().__init__()
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        self.ch = ch
        self.temb_ch = 4 * ch
        self.cemb_ch = 4 * ch  # the original hard-codes 512 inside ResnetBlock (see module doc)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.cond_drop_prob = cond_drop_prob

        def block(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, dropout, self.temb_ch, self.cemb_ch)

        # --- embeddings (registration order fixes the state_dict order) ---
        self.null_classes_emb = nn.Parameter(torch.randn(ch))  # [ch], N(0, 1)
        self.temb = _EmbedMLP(ch, self.temb_ch)  # temb.dense.{0,1}
        self.classes_emb = nn.Embedding(n_classes, ch)  # [n_classes, ch], N(0, 1)
        self.cemb = _EmbedMLP(ch, self.cemb_ch)  # cemb.dense.{0,1}

        # --- downsampling ---
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + ch_mult
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i]
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(block(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)

        # --- middle ---
        self.mid = nn.Module()
        self.mid.block_1 = block(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = block(block_in, block_in)

        # --- upsampling: built from the lowest resolution up, stored by level index ---
        up_levels = []
        for i in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i]
            skip_in = ch * ch_mult[i]
            for j in range(num_res_blocks + 1):
                if j == num_res_blocks:
                    skip_in = ch * in_ch_mult[i]
                level.block.append(block(block_in + skip_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            up_levels.insert(0, level)  # up[i] is resolution level i; up[L-1] runs first
        self.up = nn.ModuleList(up_levels)

        # --- end ---
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    # ----- conditioning -----

    def _keep_mask(self, batch: int, device: torch.device, cond_drop_prob: Optional[float],
                   cond_drop_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample bool keep mask [B] (True = use the class embedding)."""
        if cond_drop_prob is None:
            cond_drop_prob = self.cond_drop_prob
        if cond_drop_mask is not None:
            return ~cond_drop_mask.to(device=device, dtype=torch.bool)
        if cond_drop_prob > 0:
            return torch.rand(batch, device=device) < (1.0 - cond_drop_prob)
        return torch.ones(batch, dtype=torch.bool, device=device)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                 cond_drop_prob: Optional[float] = None,
                 cond_drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One network pass.  x: [B, Cin, R, R], t: [B], c: [B] -> [B, out_ch, R, R]."""
        b = x.shape[0]
        assert x.shape[2] == x.shape[3] == self.resolution, (x.shape, self.resolution)
        if not torch.is_tensor(t):
            t = torch.full((b,), float(t), device=x.device)
        param_dtype = self.temb.dense[0].weight.dtype

        # timestep embedding: [B] -> [B, ch] -> [B, D]
        temb = self.temb(ref_timestep_embedding(t, self.ch).to(param_dtype))

        # class embedding, null vector mixed in BEFORE the MLP: [B] -> [B, ch] -> [B, D]
        keep = self._keep_mask(b, x.device, cond_drop_prob, cond_drop_mask)
        keep = keep.to(param_dtype)[:, None]  # [B, 1] in {0, 1}
        cemb_in = keep * self.classes_emb(c) + (1.0 - keep) * self.null_classes_emb[None, :]
        cemb = self.cemb(cemb_in)

        # down path; hs is the skip stack
        hs = [self.conv_in(x)]  # [B, ch, R, R]
        for i in range(self.num_resolutions):
            level = self.down[i]
            for j in range(self.num_res_blocks):
                h = level.block[j](hs[-1], temb, cemb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
                hs.append(h)
            if i != self.num_resolutions - 1:
                hs.append(level.downsample(hs[-1]))

        # middle at the lowest resolution
        h = hs[-1]
        h = self.mid.block_1(h, temb, cemb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb, cemb)

        # up path: levels L-1 .. 0; each block eats concat([h, skip]) on channels (h first)
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j in range(self.num_res_blocks + 1):
                h = level.block[j](torch.cat([h, hs.pop()], dim=1), temb, cemb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        assert not hs

        h = self.conv_out(swish(self.norm_out(h)))  # [B, out_ch, R, R]
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, mode: str,
                cond_drop_prob: Optional[float] = None, cond_drop_mask: Optional[torch.Tensor] = None,
                cond_scale: Optional[float] = None) -> torch.Tensor:
        """'train': one pass (cond_drop_prob None -> the constructor default; cond_scale ignored).

        'test': cond_scale is required; cond_drop_prob None -> 0.0.  With s = cond_scale:
        s == 0 -> one pass; else (1 + s) * out - s * null, null being a pass with cond_drop_prob=1.0.
        cond_drop_mask: bool [B], True = DROP the label (overrides cond_drop_prob for `out`).
        """
        if mode == "train":
            return self._forward(x, t, c, cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask)
        if mode == "test":
            if cond_scale is None:
                raise ValueError("mode 'test' needs cond_scale (the original crashes on None)")
            if cond_drop_prob is None:
                cond_drop_prob = 0.0
            out = self._forward(x, t, c, cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask)
            if cond_scale == 0:
                return out
            null = self._forward(x, t, c, cond_drop_prob=1.0)
            return (1.0 + cond_scale) * out - cond_scale * null
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")


def count_params(model: nn.Module) -> int:
    """Total number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The iterations the benchmark times
# ---------------------------------------------------------------------------------------------


def model_kwargs(config) -> dict:
    """RefConditionalModel kwargs from one of our DDPM recipe configs."""
    m, d = config.model, config.data
    return dict(ch=m.ch, out_ch=m.out_ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, in_channels=m.in_channels,
                resolution=d.image_size, n_classes=d.n_classes, resamp_with_conv=m.resamp_with_conv)


def _adam(params, o) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0)


def _coeffs(abar: torch.Tensor, t: torch.Tensor):
    a = abar[t].view(-1, 1, 1, 1)
    return a.sqrt(), (1.0 - a).sqrt()


@torch.no_grad()
def _ema_(ema: nn.Module, model: nn.Module, rate: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - rate)


class TorchSFDIteration:
    """One SFD iteration (fake-score update, then generator update) of ``config`` at batch ``batch``.

    Networks start as copies of one randomly initialised UNet (as the bench's JAX side: teacher = fake score =
    generator). Random draws come from torch's generator; labels are the remain labels (uniform over the
    classes other than ``distill.label_to_forget``), the forget label and ``distill.label_to_override``.
    """

    def __init__(self, config, alphas_cumprod: np.ndarray, batch: int, seed: int = 0):
        torch.manual_seed(seed)
        d = config.distill
        self.d, self.B = d, batch
        self.fused = bool(d.get("fused", True))
        self.teacher = RefConditionalModel(**model_kwargs(config))
        self.generator = copy.deepcopy(self.teacher)
        self.fake = copy.deepcopy(self.teacher)
        self.ema = copy.deepcopy(self.teacher)
        for p in list(self.teacher.parameters()) + list(self.ema.parameters()):
            p.requires_grad_(False)
        self.g_opt = _adam(self.generator.parameters(), config.g_optim)
        self.sg_opt = _adam(self.fake.parameters(), config.sg_optim)
        self.g_clip, self.sg_clip = float(config.g_optim.grad_clip), float(config.sg_optim.grad_clip)
        self.ema_rate = float(config.model.ema_rate)
        self.abar = torch.as_tensor(np.asarray(alphas_cumprod, np.float32))
        a = self.abar[int(d.t_init)]
        self.init_a, self.init_b, self.init_sigma = a.sqrt(), (1.0 - a).sqrt(), (1.0 / a - 1.0).sqrt()
        self.t_init = int(d.t_init)
        self.n_classes, self.forget_label = int(config.data.n_classes), int(d.label_to_forget)
        override = d.get("label_to_override", None)
        self.override = None if override in (None, "") else int(override)
        self.forgets = self.forget_label >= 0
        self.shape = (batch, int(config.model.in_channels), int(config.data.image_size), int(config.data.image_size))

    # -- draws
    def _remain_labels(self, n):
        classes = torch.tensor([c for c in range(self.n_classes) if c != self.forget_label])
        return classes[torch.randint(0, len(classes), (n,))]

    def _override_labels(self, n):
        if self.override is not None:
            return torch.full((n,), self.override, dtype=torch.long)
        r = torch.randint(0, self.n_classes - 1, (n,))
        return torch.where(r == self.forget_label, torch.full_like(r, self.n_classes - 1), r)

    def _t(self, n):
        return torch.randint(int(self.d.t_min), int(self.d.t_max), (n,))

    def _gen(self, z, labels):
        x_t = self.init_b * z
        t = torch.full((z.shape[0],), float(self.t_init))
        return x_t / self.init_a - self.init_sigma * self.generator(x_t, t, labels, "test", cond_drop_prob=0.0,
                                                                     cond_scale=0.0)

    def _sid(self, x0, labels_fake, labels_teacher, t, e):
        aa, bb = _coeffs(self.abar, t)
        x_t = aa * x0 + bb * e
        tf = t.float()
        sg_x = (x_t - bb * self.fake(x_t, tf, labels_fake, "test", cond_scale=0.0)) / aa
        p_x = (x_t - bb * self.teacher(x_t, tf, labels_teacher, "test", cond_scale=0.0)) / aa
        omega = (p_x - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5).detach()
        alpha = float(self.d.alpha)
        if alpha == 1.0 or bool(self.d.use_diffinst):
            integrand = (p_x - sg_x) * (sg_x - x0)
        else:
            integrand = (p_x - sg_x) * ((p_x - x0) - alpha * (p_x - sg_x))
        return (integrand / omega).sum(dim=(1, 2, 3))

    def _eps_loss(self, x0, labels, t, e, drop=None):
        aa, bb = _coeffs(self.abar, t)
        out = self.fake(aa * x0 + bb * e, t.float(), labels, "train", cond_drop_mask=drop)
        return ((e - out) ** 2).sum(dim=(1, 2, 3))

    def step(self) -> dict:
        d, B = self.d, self.B
        sg_r, sg_f = float(d.sg_remain_coef), float(d.sg_forget_coef)
        g_r, g_f = float(d.g_remain_coef), float(d.g_forget_coef)
        do_sg_f, do_g_f = self.forgets and sg_f > 0, self.forgets and g_f > 0
        c = self._remain_labels(B)
        forget = torch.full((B,), self.forget_label, dtype=torch.long)

        # A. fake-score update on generator samples (no gradient to G)
        self.generator.eval()
        self.fake.train()
        z_r, t_r, e_r = torch.randn(self.shape), self._t(B), torch.randn(self.shape)
        drop = torch.rand(B) < float(d.cond_drop_prob)
        with torch.no_grad():
            if do_sg_f and self.fused:
                z_f, t_f, e_f = torch.randn(self.shape), self._t(B), torch.randn(self.shape)
                x0 = self._gen(torch.cat([z_r, z_f]), torch.cat([c, forget]))
            else:
                x0_r = self._gen(z_r, c)
                if do_sg_f:
                    z_f, t_f, e_f = torch.randn(self.shape), self._t(B), torch.randn(self.shape)
                    x0_f = self._gen(z_f, forget)
        if do_sg_f and self.fused:
            per = self._eps_loss(x0, torch.cat([c, forget]), torch.cat([t_r, t_f]), torch.cat([e_r, e_f]),
                                 torch.cat([drop, torch.zeros(B, dtype=torch.bool)]))
            l_r, l_f = per[:B].mean(), per[B:].mean()
        else:
            l_r = self._eps_loss(x0_r, c, t_r, e_r, drop).mean()
            l_f = self._eps_loss(x0_f, forget, t_f, e_f).mean() if do_sg_f else torch.zeros(())
        sg_loss = sg_r * l_r + sg_f * l_f
        self.sg_opt.zero_grad(set_to_none=True)
        sg_loss.backward()
        torch.nn.utils.clip_grad_value_(self.fake.parameters(), self.sg_clip)
        self.sg_opt.step()

        # B. generator update with the just-updated fake score (frozen) and the teacher
        self.generator.train()
        self.fake.eval()
        self.teacher.eval()
        for p in self.fake.parameters():
            p.requires_grad_(False)
        gz_r, gt_r, ge_r = torch.randn(self.shape), self._t(B), torch.randn(self.shape)
        if do_g_f:
            gz_f, gt_f, ge_f = torch.randn(self.shape), self._t(B), torch.randn(self.shape)
            override = self._override_labels(B)
        if do_g_f and self.fused:
            x0g = self._gen(torch.cat([gz_r, gz_f]), torch.cat([c, forget]))
            per = self._sid(x0g, torch.cat([c, forget]), torch.cat([c, override]), torch.cat([gt_r, gt_f]),
                            torch.cat([ge_r, ge_f]))
            gl_r, gl_f = per[:B].mean(), per[B:].mean()
        else:
            gl_r = self._sid(self._gen(gz_r, c), c, c, gt_r, ge_r).mean()
            gl_f = (self._sid(self._gen(gz_f, forget), forget, override, gt_f, ge_f).mean() if do_g_f
                    else torch.zeros(()))
        g_loss = g_r * gl_r + g_f * gl_f
        self.g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        torch.nn.utils.clip_grad_value_(self.generator.parameters(), self.g_clip)
        self.g_opt.step()
        for p in self.fake.parameters():
            p.requires_grad_(True)
        _ema_(self.ema, self.generator, self.ema_rate)
        return {"sg_total": float(sg_loss.detach()), "g_total": float(g_loss.detach())}


class TorchPretrainIteration:
    """One DDPM pretraining step of ``config`` at batch ``batch`` on fixed random images in [-1, 1]."""

    def __init__(self, config, alphas_cumprod: np.ndarray, batch: int, seed: int = 0):
        torch.manual_seed(seed)
        self.model = RefConditionalModel(**model_kwargs(config))
        self.ema = copy.deepcopy(self.model)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.opt = _adam(self.model.parameters(), config.optim)
        self.clip = float(config.optim.grad_clip)
        self.ema_rate = float(config.model.ema_rate)
        self.drop_prob = float(config.model.cond_drop_prob)
        self.abar = torch.as_tensor(np.asarray(alphas_cumprod, np.float32))
        self.T = len(alphas_cumprod)
        r, ch = int(config.data.image_size), int(config.model.in_channels)
        self.images = torch.rand(batch, ch, r, r) * 2 - 1
        self.labels = torch.arange(batch) % int(config.data.n_classes)

    def step(self) -> dict:
        B = self.images.shape[0]
        self.model.train()
        t = torch.randint(0, self.T, (B // 2 + 1,))
        t = torch.cat([t, self.T - 1 - t])[:B]
        e = torch.randn_like(self.images)
        drop = torch.rand(B) < self.drop_prob
        aa, bb = _coeffs(self.abar, t)
        out = self.model(aa * self.images + bb * e, t.float(), self.labels, "train", cond_drop_mask=drop)
        loss = ((e - out) ** 2).sum(dim=(1, 2, 3)).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        _ema_(self.ema, self.model, self.ema_rate)
        return {"loss": float(loss.detach())}


def threads() -> dict:
    """PyTorch's thread settings as they are (the benchmark leaves its defaults alone)."""
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available()), "version": torch.__version__}
