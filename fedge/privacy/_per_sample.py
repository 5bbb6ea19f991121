"""Faster per-sample gradients and clipping for fedge's DP-SGD, on Opacus's seams.

On small models Opacus's `hooks` mode is bound by per-op overhead and memory
passes, not FLOPs: a full backward hook on every layer, every backprop rescaled
by the batch size, each per-sample gradient copied into a freshly zeroed buffer,
the parameter list re-walked several times per optimizer step. Here the same
quantities are computed with fewer, larger ops. Only the objects that
`FedgePrivacyEngine` builds use these paths: Opacus's global sampler registry
(`register_grad_sampler`) is left untouched. The optimizer keeps Opacus's DP
semantics exactly: flat clipping of each example's whole gradient to
`max_grad_norm`, Gaussian noise of std `noise_multiplier * max_grad_norm`,
division by the expected batch size.

With both of fedge's hooks and optimizer (as `FedgePrivacyEngine` builds them), a
Linear weight on (batch, features) input keeps no per-sample gradient at all:
example i's gradient is the outer product b_i a_i^T of its scaled backprop and its
input, so its squared norm is |b_i|^2 |a_i|^2 and the clipped sum is one matmul
(c * B)^T A. The hooks store (B, A) as `p.grad_sample_factors` in place of
`p.grad_sample` (None for such a weight), which skips writing and twice reading a
batch x out x in tensor (4 MB a step for the digits CNN's first Linear).
`FedgeDPOptimizer.grad_samples` still returns the materialized tensors.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from torch.utils.hooks import RemovableHandle

from fedge.privacy._opacus import (
    DPGRU,
    DPLSTM,
    DPRNN,
    DPOptimizer,
    GradSampleHooks,
    PrivacyEngine,
    check_processed_flag,
    mark_as_processed,
    prepare_layer,
    promote_current_grad_sample,
    trainable_parameters,
)

GradSamples = dict[nn.Parameter, torch.Tensor]
Factors = tuple[torch.Tensor, torch.Tensor]

# A Linear weight's per-sample gradients as (backprops, activations), on the parameter.
# Opacus's processed flag goes on the activations: the bias's grad_sample is the backprops.
FACTORS = "grad_sample_factors"


def _wants(parameter: nn.Parameter | None) -> bool:
    return parameter is not None and parameter.requires_grad


def _factors(p: nn.Parameter) -> Factors | None:
    return getattr(p, FACTORS, None)


def _outer(factors: Factors) -> torch.Tensor:
    """The per-sample gradients that a weight's factors stand for."""
    backprops, activations = factors
    return backprops.unsqueeze(2) * activations.unsqueeze(1)


def _materialize_factors(p: nn.Parameter) -> None:
    """Turn `p`'s factors into its `grad_sample`, keeping Opacus's processed flag."""
    factors = getattr(p, FACTORS)
    delattr(p, FACTORS)
    p.grad_sample = _outer(factors)
    if hasattr(factors[1], "_processed"):
        mark_as_processed(p.grad_sample)


def linear_grad_sample(
    layer: nn.Linear, x: torch.Tensor, grad_out: torch.Tensor, scale: float
) -> GradSamples:
    """Per-sample gradients of a Linear on (batch, features) input: one outer product each."""
    samples = {}
    grad_out = grad_out * scale
    if _wants(layer.weight):
        samples[layer.weight] = grad_out.unsqueeze(2) * x.unsqueeze(1)
    if _wants(layer.bias):
        samples[layer.bias] = grad_out
    return samples


def conv2d_grad_sample(
    layer: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, scale: float
) -> GradSamples:
    """Per-sample gradients of a Conv2d.

    The weight gradient of a convolution whose groups are the examples is the stack
    of the per-example weight gradients, so one grouped `conv2d_weight` gives them
    all without Opacus's im2col buffer (9x the input for a 3x3 kernel). With one
    input channel per group that buffer is small and im2col + one batched matmul is
    faster (digits CNN, 1 thread: 67 vs 148 us for its first conv, 380 vs 452 us the
    other way round for its second).
    """
    samples = {}
    n = x.shape[0]
    if _wants(layer.weight):
        x = x * scale
        if layer.in_channels // layer.groups == 1 and layer.groups == 1:
            columns = functional.unfold(
                x, layer.kernel_size, layer.dilation, layer.padding, layer.stride
            )
            weight = torch.bmm(grad_out.reshape(n, layer.out_channels, -1), columns.transpose(1, 2))
        else:
            weight = torch.nn.grad.conv2d_weight(
                x.reshape(1, n * layer.in_channels, *x.shape[2:]),
                (n * layer.out_channels, *layer.weight.shape[1:]),
                grad_out.reshape(1, n * layer.out_channels, *grad_out.shape[2:]),
                layer.stride,
                layer.padding,
                layer.dilation,
                n * layer.groups,
            )
        samples[layer.weight] = weight.view(n, *layer.weight.shape)
    if _wants(layer.bias):
        samples[layer.bias] = grad_out.sum((2, 3)).mul_(scale)
    return samples


def group_norm_grad_sample(
    layer: nn.GroupNorm, x: torch.Tensor, grad_out: torch.Tensor, scale: float
) -> GradSamples:
    """Per-sample gradients of a GroupNorm's affine weight and bias."""
    samples = {}
    flat_grad = grad_out.flatten(2)
    if _wants(layer.weight):
        normalized = functional.group_norm(x, layer.num_groups, eps=layer.eps).flatten(2)
        samples[layer.weight] = (normalized * flat_grad).sum(2).mul_(scale)
    if _wants(layer.bias):
        samples[layer.bias] = flat_grad.sum(2).mul_(scale)
    return samples


_FAST_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm)


def _fast_sampler(module: nn.Module, x: torch.Tensor) -> Any:
    """fedge's sampler for `module` on input `x`, or None to leave it to Opacus.

    An empty batch (Poisson sampling can draw one) goes to Opacus: a grouped
    convolution with zero groups is an error.
    """
    if x.shape[0] == 0:
        return None
    kind = type(module)
    if kind is nn.Linear and x.dim() == 2:
        return linear_grad_sample
    if kind is nn.GroupNorm and x.dim() > 2:
        return group_norm_grad_sample
    if (
        kind is nn.Conv2d
        and x.dim() == 4
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return conv2d_grad_sample
    return None


class FedgeGradSampleHooks(GradSampleHooks):
    """Opacus's hooks, with fedge's samplers for Linear, Conv2d and GroupNorm layers.

    Those layers get a forward hook that saves the input and puts a tensor hook on
    the output, instead of Opacus's full backward hook: that hook wraps every input
    and output of the layer in an extra autograd node, which costs about 0.9 ms a
    step on the digits CNN against 0.3 ms for the tensor hooks. A layer run once per
    forward pass gets its per-sample gradients straight from the sampler (no zeroed
    buffer and copy per parameter), and the sampler undoes the mean loss's 1/batch
    on its smallest tensor. Layers used more than once per pass (tied weights), other
    layer types and non-batch-first inputs take Opacus's own path.

    With `for_fedge_optimizer` set (only when `FedgeDPOptimizer` reads the output):

    - a Linear weight on 2-D input gets `grad_sample_factors` instead of a
      `grad_sample`. A second backward pass before `zero_grad` (accumulation)
      materializes them first, so Opacus's accumulation rules apply as before.
    - if every parameter belongs to exactly one of fedge's layer types, autograd
      skips the batch gradient of every parameter (DP-SGD replaces it with the
      noised sum of clipped per-sample gradients anyway; on the digits CNN it is
      about a tenth of a private step). During the model's forward pass the
      parameters are marked as not requiring a gradient, and a copy of the
      model's input that requires one stands in for it, so each layer's output
      gradient still flows to the hooks; the marks are undone when the forward
      pass returns or raises. `p.grad` is then None after backward, until the
      optimizer step sets it.
    """

    for_fedge_optimizer = False

    def add_hooks(
        self,
        *,
        loss_reduction: str = "mean",
        batch_first: bool = True,
        force_functorch: bool = False,
    ) -> None:
        """Attach the hooks; Opacus's `add_hooks` except for fedge's layer types."""
        self._layer_parameters: dict[nn.Module, tuple[nn.Parameter, ...]] = {}
        self._skipped: dict[int, nn.Parameter] = {}  # by id: tensors do not hash by value
        if force_functorch or not batch_first:
            super().add_hooks(
                loss_reduction=loss_reduction,
                batch_first=batch_first,
                force_functorch=force_functorch,
            )
            return
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        handles: list[RemovableHandle] = []
        self._module.autograd_grad_sample_hooks = handles
        self.autograd_grad_sample_hooks = handles
        for module in self.iterate_submodules(self._module):
            if type(module) in _FAST_TYPES:
                self._layer_parameters[module] = tuple(module.parameters(recurse=False))
                watch = partial(self._capture_and_watch, loss_reduction=loss_reduction)
                handles.append(module.register_forward_hook(watch))
                continue
            if type(module) in (DPRNN, DPLSTM, DPGRU):  # their RNNLinear cells are hooked
                continue
            if type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=batch_first)
            handles.append(module.register_forward_hook(self.capture_activations_hook))
            backprops = partial(
                self.capture_backprops_hook, loss_reduction=loss_reduction, batch_first=True
            )
            handles.append(module.register_full_backward_hook(backprops))
        if self._only_fedge_layers():
            root = self._module
            handles.append(root.register_forward_pre_hook(self._skip_batch_grads, with_kwargs=True))
            handles.append(root.register_forward_hook(self._restore_batch_grads, always_call=True))
        self.enable_hooks()

    def _only_fedge_layers(self) -> bool:
        """Every parameter belongs to exactly one module, of fedge's layer types."""
        owners = [
            (module, p) for module in self._module.modules() for p in module.parameters(False)
        ]
        return len({id(p) for _, p in owners}) == len(owners) and all(
            module in self._layer_parameters for module, _ in owners
        )

    def _skip_batch_grads(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook on the model: no batch gradient for any parameter this pass."""
        if not (
            self.for_fedge_optimizer
            and self.hooks_enabled
            and module.training
            and torch.is_grad_enabled()
            and not self._skipped
        ):
            return None
        inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        # an empty (Poisson) batch or a non-float input keeps Opacus's usual path
        if not inputs or not all(t.is_floating_point() and t.dim() and len(t) for t in inputs):
            return None
        layers = self._layer_parameters.values()
        self._skipped = {id(p): p for params in layers for p in params if p.requires_grad}
        for p in self._skipped.values():
            p.requires_grad_(False)

        def tracked(value: Any) -> Any:
            """A copy that requires a gradient (not a leaf, so in-place ops on it work)."""
            if isinstance(value, torch.Tensor) and not value.requires_grad:
                return value.detach().requires_grad_().clone()
            return value

        return tuple(map(tracked, args)), {k: tracked(v) for k, v in kwargs.items()}

    def _restore_batch_grads(self, *_: Any) -> None:
        """Forward hook on the model (also when forward raises): undo `_skip_batch_grads`."""
        for p in self._skipped.values():
            p.requires_grad_(True)
        self._skipped = {}

    def _capture_and_watch(
        self,
        module: nn.Module,
        forward_input: list[torch.Tensor],
        output: torch.Tensor,
        loss_reduction: str,
    ) -> None:
        """Save the input like Opacus, then hook the output's gradient."""
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        skipped = self._skipped
        wanted = [p for p in self._layer_parameters[module] if p.requires_grad or id(p) in skipped]
        if not wanted:
            return
        if not hasattr(module, "activations"):
            module.activations = []
        module.activations.append([t.detach() for t in forward_input])
        for p in wanted:
            p._forward_counter += 1
        if output.requires_grad:
            output.register_hook(partial(self._output_grad_hook, module, loss_reduction))

    def _output_grad_hook(
        self, module: nn.Module, loss_reduction: str, grad_output: torch.Tensor
    ) -> None:
        self.capture_backprops_hook(module, (), (grad_output,), loss_reduction, True)

    def capture_backprops_hook(
        self,
        module: nn.Module,
        _forward_input: Any,
        forward_output: Any,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        """Compute `module`'s per-sample gradients from its saved input and output gradient."""
        activations = getattr(module, "activations", None)
        own = self._layer_parameters.get(module)
        parameters = (
            [p for _, p in trainable_parameters(module)]
            if own is None
            else [p for p in own if p.requires_grad]
        )
        sampler = (
            _fast_sampler(module, activations[0][0])
            if activations and len(activations) == 1 and len(activations[0]) == 1
            else None
        )
        if (
            not self.hooks_enabled
            or sampler is None
            or not batch_first
            or loss_reduction not in ("mean", "sum")
            or hasattr(module, "max_batch_len")
            or any(p._forward_counter != 1 for p in parameters)
            or any(hasattr(p, "_current_grad_sample") for p in parameters)
        ):
            super().capture_backprops_hook(
                module, _forward_input, forward_output, loss_reduction, batch_first
            )
            return
        (x,) = activations.pop()
        grad_out = forward_output[0].detach()
        x = x.to(grad_out.dtype)
        # a mean loss scales each example's gradient by 1/batch; the sampler undoes it
        scale = float(x.shape[0]) if loss_reduction == "mean" else 1.0
        factored = None
        if sampler is linear_grad_sample and self.for_fedge_optimizer and _wants(module.weight):
            factored = module.weight
            if _factors(factored) is not None:  # accumulation: Opacus's rules, materialized
                _materialize_factors(factored)
            if factored.grad_sample is not None:
                factored = None
        if factored is None:
            samples = sampler(module, x, grad_out, scale)
        else:
            backprops = grad_out * scale
            setattr(factored, FACTORS, (backprops, x))
            samples = {module.bias: backprops} if _wants(module.bias) else {}
        for parameter, sample in samples.items():
            parameter._current_grad_sample = sample
        for parameter in parameters:
            parameter._forward_counter -= 1
            if parameter is factored:
                continue
            promote_current_grad_sample(parameter)
            if not self.grad_accumulation_allowed and isinstance(parameter.grad_sample, list):
                raise ValueError(
                    "Poisson sampling is not compatible with grad accumulation. "
                    "Call optimizer.step() after every forward/backward pass."
                )

    def cleanup(self) -> None:
        """Opacus's cleanup, which also drops the factors."""
        super().cleanup()
        for p in self._module.parameters():
            if hasattr(p, FACTORS):
                delattr(p, FACTORS)


class FedgeDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with the clip, noise and scale steps in fewer ops.

    Same mechanism: each example's gradient is clipped as one vector to
    `max_grad_norm` (factor `max_grad_norm / (norm + 1e-6)`, at most 1), the clipped
    gradients are summed, Gaussian noise of std `noise_multiplier * max_grad_norm`
    is added to every coordinate, and the sum is divided by the expected batch
    size times the accumulated iterations. The noise for all parameters is drawn
    in one call, so its values differ from Opacus's for the same generator seed,
    but not its distribution. Secure mode takes Opacus's path.

    Weights whose hooks left `grad_sample_factors` (see `FedgeGradSampleHooks`) are
    clipped from the factors; every Opacus method that reads per-sample gradients
    sees them materialized.
    """

    def _get_flat_grad_sample(self, p: torch.Tensor) -> torch.Tensor:
        """Opacus's, with a factored weight's per-sample gradients materialized."""
        factors = _factors(p)
        return super()._get_flat_grad_sample(p) if factors is None else _outer(factors)

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes since `zero_grad`; factors always stand for exactly one."""
        counts = set()
        for p in self.params:
            sample = getattr(p, "grad_sample", None)
            if _factors(p) is not None or isinstance(sample, torch.Tensor):
                counts.add(1)
            elif isinstance(sample, list):
                counts.add(len(sample))
            else:
                raise ValueError(f"Unexpected grad_sample type: {type(sample)}")
        if len(counts) > 1:
            raise ValueError("Number of accumulated steps is inconsistent across parameters")
        return counts.pop()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Opacus's zero_grad, which also drops the factors: none may reach the next step.

        Like torch's optimizers (not Opacus's) it sets `p.grad` to None by default:
        the step overwrites it, so zeroing it is wasted work.
        """
        for p in self.params:
            if hasattr(p, FACTORS):
                delattr(p, FACTORS)
        super().zero_grad(set_to_none)

    def pre_step(self, closure: Any = None) -> bool:
        """Opacus's pre_step, without materializing all per-sample gradients to count them."""
        if not self.params:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise_and_scale()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def clip_and_accumulate(self) -> None:
        """Clip each example's gradient and add the clipped sum to `p.summed_grad`.

        A weight with factors (B, A) adds |b_i| |a_i| (its gradient's norm) to example
        i's norm and (c * B)^T A (its clipped sum) to the summed gradient.
        """
        params = self.params
        factors = [_factors(p) for p in params]
        # no factors are stored for an empty batch, which gets Opacus's zero clip factors
        if factors[0] is None and len(self._get_flat_grad_sample(params[0])) == 0:
            super().clip_and_accumulate()
            return
        terms: list[torch.Tensor | Factors] = []
        norms = []
        for p, pair in zip(params, factors, strict=True):
            if pair is None:
                sample = self._get_flat_grad_sample(p)
                flat = sample.reshape(len(sample), -1).to(p.dtype)
                terms.append(flat)
                norms.append(torch.linalg.vector_norm(flat, dim=1))
            else:
                backprops, activations = (t.to(p.dtype) for t in pair)
                terms.append((backprops, activations))
                norms.append(
                    torch.linalg.vector_norm(backprops, dim=1)
                    * torch.linalg.vector_norm(activations, dim=1)
                )
        per_example = torch.stack(norms, dim=1).norm(2, dim=1)
        factor = (self.max_grad_norm / (per_example + 1e-6)).clamp(max=1.0)
        for p, pair, term in zip(params, factors, terms, strict=True):
            flag = p.grad_sample if pair is None else pair[1]
            check_processed_flag(flag)
            if isinstance(term, torch.Tensor):
                grad = (factor.to(term.dtype) @ term).view(p.shape)
            else:
                backprops, activations = term
                grad = (backprops * factor.to(p.dtype).unsqueeze(1)).t() @ activations
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            mark_as_processed(flag)

    def add_noise_and_scale(self) -> None:
        """Opacus's add_noise then scale_grad, as one op per parameter.

        p.grad = summed_grad / D + N(0, (σC / D)^2) is (summed_grad + N(0, (σC)^2)) / D,
        with D the expected batch size times the accumulated iterations (1 for a
        summed loss). The noise for all parameters is drawn in one call.
        """
        if self.secure_mode:
            self.add_noise()
            self.scale_grad()
            return
        mean_loss = self.loss_reduction == "mean"
        denominator = self.expected_batch_size * self.accumulated_iterations if mean_loss else 1
        std = self.noise_multiplier * self.max_grad_norm / denominator
        params = self.params
        sizes = [p.summed_grad.numel() for p in params]
        reference = params[0].summed_grad
        noise = torch.normal(
            mean=0.0,
            std=std,
            size=(sum(sizes),),
            generator=self.generator,
            device=reference.device,
            dtype=reference.dtype,
        )
        for p, chunk in zip(params, noise.split(sizes), strict=True):
            check_processed_flag(p.summed_grad)
            grad = torch.add(chunk.view_as(p.summed_grad), p.summed_grad, alpha=1 / denominator)
            p.grad = grad.view_as(p)
            mark_as_processed(p.summed_grad)


class FedgePrivacyEngine(PrivacyEngine):
    """PrivacyEngine whose `make_private` (hooks mode, flat clipping) uses the fast paths.

    Other modes and clipping rules fall back to Opacus's classes.
    """

    def make_private(self, **kwargs: Any) -> Any:
        """Opacus's make_private; the hooks serve fedge's optimizer if it clips."""
        prepared = super().make_private(**kwargs)
        hooks, optimizer = prepared[0], prepared[1]
        if isinstance(hooks, FedgeGradSampleHooks) and isinstance(optimizer, FedgeDPOptimizer):
            hooks.for_fedge_optimizer = True
        return prepared

    def _prepare_model(self, module: nn.Module, **kwargs: Any) -> Any:
        if kwargs.get("wrap_model", True) or kwargs.get("grad_sample_mode", "hooks") != "hooks":
            return super()._prepare_model(module, **kwargs)
        self.validate(module=module, optimizer=None, data_loader=None)
        return FedgeGradSampleHooks(
            module,
            batch_first=kwargs.get("batch_first", True),
            loss_reduction=kwargs.get("loss_reduction", "mean"),
        )

    def _prepare_optimizer(self, **kwargs: Any) -> DPOptimizer:
        chosen = super()._prepare_optimizer(**kwargs)
        if type(chosen) is not DPOptimizer or chosen.secure_mode:
            return chosen
        return FedgeDPOptimizer(
            chosen.original_optimizer,
            noise_multiplier=chosen.noise_multiplier,
            max_grad_norm=chosen.max_grad_norm,
            expected_batch_size=chosen.expected_batch_size,
            loss_reduction=chosen.loss_reduction,
            generator=chosen.generator,
        )
