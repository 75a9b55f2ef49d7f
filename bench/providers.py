"""The attention implementations compared, each able to say why it cannot run a case here.

A provider builds, for one case, a function ``attn(q, k, v) -> out`` with ``q (B, Hq, Tq, D)``,
``k, v (B, Hkv, Tk, D)`` and ``out (B, Hq, Tq, D)``, causal meaning bottom-right aligned (query ``i``
sees keys ``j <= i + Tk - Tq``), scale ``1/sqrt(D)``. Before building it, the runner asks
:meth:`Provider.not_supported_reasons`; a non-empty list is shown in place of a time. A provider may
also raise :class:`NotSupportedError` (or effattn's ``UnsupportedInputError``) from the call itself.

Peers (``peer=True``) are the torch implementations that effattn is measured against: the best of
them in a case gives the "vs best peer" speed-up.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
import warnings
from collections.abc import Callable

import torch

from bench.cases import Case

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Copies of the (B, Hq, Tq, Tk) score matrix alive at once in a materialising implementation
# (scores, probabilities, masks, and the tensors autograd saves for the backward): an estimate, used
# to skip cases that cannot fit rather than to predict the peak.
SCORE_COPIES = {"fwd": 3, "bwd": 5, "fwd+bwd": 5}
GIB = 1 << 30
# What torch's SDPA raises when the forced backend cannot run the input (CUDA; CPU).
NO_SDPA_KERNEL = ("No available kernel", "No viable backend")
# Torch recompiles FlexAttention for every new shape, dtype and mask; a sweep needs more than dynamo's default.
FLEX_RECOMPILE_LIMIT = 512
CPU_FLEX_REASON = ("FlexAttention is compiled (torch.compile) for every shape, seconds each on a small CPU; "
                   "name it in --providers to run it anyway")


class NotSupportedError(RuntimeError):
    """A provider cannot run a case; the message says why."""


def unsupported_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "cannot run this case" rather than "broken"."""
    errors: list[type[BaseException]] = [NotSupportedError]
    try:
        from effattn import UnsupportedInputError
        errors.append(UnsupportedInputError)
    except ImportError:
        pass
    return tuple(errors)


class Provider(abc.ABC):
    """One implementation: ``name``, ``description``, whether it is a torch ``peer``."""

    name = ""
    description = ""
    peer = False

    def not_supported_reasons(self, case: Case, requested: bool = False) -> list[str]:
        """Why this provider cannot (or should not, unless ``requested`` by name) run ``case`` here; [] if it can."""
        return []

    @abc.abstractmethod
    def build(self, case: Case) -> AttentionFn:
        """The function ``attn(q, k, v) -> out`` for ``case``."""


def _available_bytes(device: str) -> int | None:
    """Memory a new allocation could still get: free device memory plus torch's unused cache; host MemAvailable."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _materialised_reasons(case: Case, element_size: int) -> list[str]:
    """A reason when the ``(B, Hq, Tq, Tk)`` score copies of a materialising implementation cannot fit."""
    scores = case.batch * case.heads_q * case.seqlen_q * case.seqlen_k * element_size
    need = SCORE_COPIES[case.mode] * scores
    available = _available_bytes(case.device)
    if available is not None and need > available:
        return [f"materialises {SCORE_COPIES[case.mode]} x {scores / GIB:.1f} GiB of scores, "
                f"{available / GIB:.1f} GiB available"]
    return []


def _needs_cuda(case: Case, what: str) -> list[str]:
    return [] if case.device == "cuda" else [f"{what} on CUDA only"]


def _import_reasons(module: str) -> list[str]:
    try:
        __import__(module)
    except Exception as e:  # any import failure is a reason, not a crash
        return [f"{module} cannot be imported ({type(e).__name__}: {e})"]
    return []


class NaiveProvider(Provider):
    name = "naive"
    description = "effattn.reference.naive_attention: the full (B, Hq, Tq, Tk) softmax in memory, autograd backward"

    def not_supported_reasons(self, case, requested=False):
        return _import_reasons("effattn.reference") or _materialised_reasons(case, case.torch_dtype.itemsize)

    def build(self, case):
        from effattn.reference import naive_attention

        window_right = 0 if case.causal else -1
        diag_offset = case.seqlen_k - case.seqlen_q

        def attn(q, k, v):
            return naive_attention(q, k, v, window_right=window_right, diag_offset=diag_offset)

        return attn


class SdpaProvider(Provider):
    """``torch.nn.functional.scaled_dot_product_attention``, on torch's choice of backend or a forced one."""

    peer = True

    def __init__(self, backend_name: str | None = None):
        self.backend_name = backend_name
        suffix = {None: "", "MATH": "-math", "FLASH_ATTENTION": "-flash", "EFFICIENT_ATTENTION": "-efficient",
                  "CUDNN_ATTENTION": "-cudnn"}[backend_name]
        self.name = "sdpa" + suffix
        self.description = ("torch.nn.functional.scaled_dot_product_attention"
                            + (f" forced to SDPBackend.{backend_name}" if backend_name else ", torch's choice"))

    def _backend(self):
        from torch.nn.attention import SDPBackend

        member = getattr(SDPBackend, self.backend_name, None)
        if member is None:
            raise NotSupportedError(f"this torch has no SDPBackend.{self.backend_name}")
        return member

    def not_supported_reasons(self, case, requested=False):
        if self.backend_name is None:
            return []
        reasons = _needs_cuda(case, "forcing an SDPA backend is benchmarked")
        if not reasons and self.backend_name == "MATH":
            reasons += _materialised_reasons(case, torch.float32.itemsize)  # the math path computes in fp32
        return reasons

    def build(self, case):
        import torch.nn.functional as F

        kwargs = {"enable_gqa": case.gqa > 1}
        if case.causal and case.seqlen_q == case.seqlen_k:
            kwargs["is_causal"] = True
        elif case.causal:  # SDPA's is_causal is top-left aligned; this bias is bottom-right, like the others
            from torch.nn.attention.bias import causal_lower_right
            kwargs["attn_mask"] = causal_lower_right(case.seqlen_q, case.seqlen_k)
        if self.backend_name is None:
            return functools.partial(F.scaled_dot_product_attention, **kwargs)

        from torch.nn.attention import sdpa_kernel

        backend = self._backend()

        def attn(q, k, v):
            try:
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, **kwargs)
            except RuntimeError as e:
                if not any(text in str(e) for text in NO_SDPA_KERNEL):
                    raise
            # Torch says why the forced backend declined in warnings; run again to collect them.
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
                warnings.simplefilter("always")
                with contextlib.suppress(RuntimeError):
                    F.scaled_dot_product_attention(q, k, v, **kwargs)
            why = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
            raise NotSupportedError(f"SDPBackend.{self.backend_name} declined: {why or 'no reason given'}")

        return attn


class FlexProvider(Provider):
    name = "flex"
    description = "torch.nn.attention.flex_attention compiled with torch.compile, causal as a block mask"
    peer = True

    def not_supported_reasons(self, case, requested=False):
        reasons = _import_reasons("torch.nn.attention.flex_attention")
        if not reasons and case.device == "cpu" and case.needs_grad:
            reasons.append("FlexAttention has no backward on CPU")
        elif not reasons and case.device != "cuda" and not requested:
            reasons.append(CPU_FLEX_REASON)
        return reasons

    def build(self, case):
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask = None
        if case.causal:
            offset = case.seqlen_k - case.seqlen_q

            def causal_bottom_right(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset

            block_mask = create_block_mask(causal_bottom_right, None, None, case.seqlen_q, case.seqlen_k,
                                           device=case.device)
        compiled = _compiled_flex_attention()
        enable_gqa = case.gqa > 1

        def attn(q, k, v):
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)

        return attn


@functools.cache
def _compiled_flex_attention():
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    for option in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                   "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, option):
            setattr(dynamo_config, option, max(getattr(dynamo_config, option), FLEX_RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


class EffattnProvider(Provider):
    """``effattn.flash_attention`` on its automatic backend (None) or a named one."""

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self.name = "effattn" if backend is None else f"effattn-{backend}"
        self.description = ("effattn.flash_attention, automatic backend (CUDA: triton, CPU: reference)"
                            if backend is None else f"effattn.flash_attention(backend={backend!r})")

    def not_supported_reasons(self, case, requested=False):
        reasons = _import_reasons("effattn")
        if self.backend == "triton":
            reasons += _import_reasons("triton")
            reasons += _needs_cuda(case, "the Triton kernels are timed")  # the CPU interpreter is for tests
        return reasons

    def build(self, case):
        from effattn import flash_attention

        return functools.partial(flash_attention, causal=case.causal, scale=1.0 / math.sqrt(case.headdim),
                                 backend=self.backend)


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        NaiveProvider(),
        SdpaProvider(),
        SdpaProvider("MATH"),
        SdpaProvider("FLASH_ATTENTION"),
        SdpaProvider("EFFICIENT_ATTENTION"),
        SdpaProvider("CUDNN_ATTENTION"),
        FlexProvider(),
        EffattnProvider(),
        EffattnProvider("triton"),
    )
}
BASELINE = "naive"
