r"""The SFD / pretraining iterations in PyTorch, for ``python -m sfd_jax.bench --compare=torch``.

They run the UNet of :mod:`sfd_jax.ddpm.torch_unet` the way the original PyTorch training code runs it:

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

import numpy as np
import torch
import torch.nn as nn

from sfd_jax.ddpm.torch_unet import RefConditionalModel, model_kwargs


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
