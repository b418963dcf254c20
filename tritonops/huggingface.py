"""Hugging Face transformers on tritonops: an attention implementation and RMSNorm adapters.

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tritonops")
    model.set_attn_implementation("tritonops")       # or switch a model you already have
    tritonops.patch(model)                           # transformers' RMSNorm modules -> norm_class(...)

`install()` (called by `import tritonops`) registers "tritonops" with transformers'
AttentionInterface and AttentionMaskInterface as soon as transformers.modeling_utils is
imported, without importing it itself (that takes seconds). `norm_class(cls)` gives, for an
RMSNorm class of a known family, a subclass whose forward runs tritonops.rms_norm.

Nothing here imports transformers at import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import sys
import threading
import types
import warnings

import torch

from .ops import attention as attention_ops
from .ops import norm as norm_ops

NAME = "tritonops"
_TARGET = "transformers.modeling_utils"  # defines AttentionInterface; every model imports it


# --------------------------------------------------------------------------- attention interface


_warned_output_attentions = False


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface on tritonops.attention, as its "sdpa" does it.

    query (B, H, L, D), key and value (B, Hkv, S, D) with Hkv dividing H (grouped-query
    attention runs on the Hkv heads, no repeat); attention_mask None or a 4-D bool (True:
    attend) or additive float mask broadcasting to (B, H, L, S). Returns ((B, L, H, Dv)
    contiguous, None): attention weights are never materialised.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("tritonops attention does not support `softcap` (attention logit soft-capping); "
                         "use attn_implementation=\"eager\" or \"flex_attention\" for this model")
    for sinks in ("s_aux", "sinks"):
        if kwargs.get(sinks) is not None:
            raise ValueError(f"tritonops attention does not support attention sinks (`{sinks}`); "
                             "use attn_implementation=\"eager\" or \"flex_attention\" for this model")
    if kwargs.get("output_attentions", False):
        global _warned_output_attentions
        if not _warned_output_attentions:
            _warned_output_attentions = True
            warnings.warn("tritonops attention does not return attention weights (`output_attentions=True`): "
                          "they are None; use attn_implementation=\"eager\" to get them", stacklevel=2)
    position_bias = kwargs.get("position_bias")
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as sdpa: the flag only without a mask, and never for a single query (decoding attends to
    # the whole cache); the shape test first, so a symbolic length gives a plain bool
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if torch.jit.is_tracing() and isinstance(is_causal, torch.Tensor):
        is_causal = is_causal.item()
    if is_causal and key.shape[2] > q_length:
        # prefill into an empty static cache: the positions past the queries are masked anyway
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[:, :, :, :q_length]
    if position_bias is not None:
        # transformers' own combination of the bias with the mask (or the causal pattern): a model
        # passes position_bias only where its sdpa integration, and so this function, exists
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    out = attention_ops.attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                  is_causal=bool(is_causal), scale=scaling,
                                  enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------- registration


def register() -> None:
    """Register "tritonops" with transformers' AttentionInterface (attention_forward) and
    AttentionMaskInterface (sdpa's masks: for an implementation without a mask function
    transformers builds no mask at all, padding included). Idempotent; imports transformers."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attn_implementations(model: torch.nn.Module) -> dict[str, str | None]:
    """A transformers model's attention implementations: its config's ("") and each sub-config's."""
    config = model.config
    out = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out[key] = sub._attn_implementation
    return out


def switch_attn_implementation(model: torch.nn.Module) -> dict[str, str | None] | None:
    """Switch the parts of a transformers model that run attn_implementation "sdpa" (its config
    and sub-configs) to "tritonops", the same semantics on our kernel wherever its layers run;
    the others keep theirs. Returns the implementations before, or None, with nothing changed,
    for a model that is not a transformers one, runs no "sdpa", or that transformers does not
    switch (some models only log that they cannot). The switch is the config's: models sharing
    that config object switch with it."""
    modeling_utils = sys.modules.get(_TARGET)
    if modeling_utils is None or not isinstance(model, modeling_utils.PreTrainedModel):
        return None
    before = attn_implementations(model)
    if "sdpa" not in before.values():
        return None
    register()  # idempotent; normally done when transformers loaded
    target = {key: NAME if impl == "sdpa" else impl for key, impl in before.items()}
    try:
        model.set_attn_implementation(target if len(target) > 1 else NAME)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    if attn_implementations(model) != target:
        restore_attn_implementation(model, before)
        return None
    return before


def restore_attn_implementation(model: torch.nn.Module, before: dict[str, str | None]) -> None:
    """Undo switch_attn_implementation where the model still runs "tritonops" (a part the user
    switched since keeps what they chose)."""
    now = attn_implementations(model)
    back = {key: before[key] if now.get(key) == NAME and key in before else impl for key, impl in now.items()}
    if back != now:
        model.set_attn_implementation(back if len(back) > 1 else back[""])


def _safe_register() -> None:
    try:
        register()
    except Exception as e:  # a failed registration must not fail the user's import of transformers
        warnings.warn(f"tritonops: could not register attn_implementation={NAME!r} with transformers: "
                      f"{type(e).__name__}: {e}", stacklevel=2)


class _RunAfterLoader(importlib.abc.Loader):
    """A module's own loader, then its hook's callback once the module has executed."""

    def __init__(self, loader, hook: _PostImportHook):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._hook.fire()

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs `callback` right after the module `name` is first imported, then leaves sys.meta_path.

    It finds the module through the finders after it and wraps the loader it gets: the
    import itself is theirs, unchanged. A callback that raises gives a warning, never a
    failed import."""

    def __init__(self, name: str, callback):
        self.name = name
        self.callback = callback
        self._fired = False
        self._lock = threading.Lock()
        self._searching = threading.local()  # a finder after us that asks importlib again: not us

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self._fired or getattr(self._searching, "on", False):
            return None
        self._searching.on = True
        try:
            spec = self._find_elsewhere(fullname, path, target)
        finally:
            self._searching.on = False
        if spec is None:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfterLoader(spec.loader, self)
        return spec

    def _find_elsewhere(self, fullname, path, target):
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is not self and find_spec is not None:
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    return spec
        return None

    def fire(self) -> None:
        with self._lock:
            if self._fired:
                return
            self._fired = True
        self.remove()
        try:
            self.callback()
        except Exception as e:
            warnings.warn(f"tritonops: post-import hook for {self.name} failed: {type(e).__name__}: {e}",
                          stacklevel=2)

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


_install_lock = threading.Lock()


def install() -> None:
    """Register "tritonops" with transformers' attention interface, now if transformers.modeling_utils
    is loaded, else right after it loads (a hook in sys.meta_path). Cheap: it imports nothing."""
    with _install_lock:
        if _TARGET in sys.modules:
            _safe_register()
            return
        if not any(isinstance(f, _PostImportHook) and f.name == _TARGET for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportHook(_TARGET, _safe_register))


# --------------------------------------------------------------------------- norm adapters
#
# A family is a transformers reference class, named by dotted path, and a forward on
# tritonops.rms_norm that computes what the reference's forward computes. A class whose
# methods compile to the same code as the live reference's is a member whatever its name (a
# hundred-odd transformers models copy Llama's), and one that differs in any way is not
# adapted. Before a family is first used, the live reference is run against the adapter's
# formula in float64 torch math (_pin_failure): a transformers release that changes what a
# reference computes disables the family instead of adapting it with stale semantics.


def _original_forward(self, x):
    return self._tritonops_base.forward(self, x)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """tritonops.rms_norm outside autocast: the forwards adapted cast explicitly, so autocast
    leaves their dtypes alone, where it would run our op (as torch's) in float32 on CUDA."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return norm_ops.rms_norm(x, weight.shape, weight, eps)
    return norm_ops.rms_norm(x, weight.shape, weight, eps)


def _float64_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """tritonops.rms_norm's result in plain torch: computed in float64, rounded once to x's dtype."""
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(x.dtype)


def _weight_then_input_dtype(eps_attr: str, norm):
    """Llama's `weight * normalized.to(input dtype)`: output in promote_types(weight, input)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not isinstance(weight, torch.Tensor) or weight.shape != hidden_states.shape[-1:]:
            return _original_forward(self, hidden_states)  # a weight that broadcasts otherwise
        dtype = torch.promote_types(weight.dtype, hidden_states.dtype)
        # both casts are exact upcasts (or none): one rounding, where the original has two
        return norm(hidden_states.to(dtype), weight.to(dtype), getattr(self, eps_attr))

    return forward


def _input_dtype(eps_attr: str, norm, one_plus: bool = False):
    """Olmo2's `(weight * normalized).to(input dtype)`, and with one_plus Gemma's
    `normalized * (1 + weight.float())`: output in the input's dtype."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not isinstance(weight, torch.Tensor) or weight.shape != hidden_states.shape[-1:]:
            return _original_forward(self, hidden_states)
        if one_plus:
            # 1 + weight in float32 as the original, or in float64 where the input is float64
            wide = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
            weight = 1.0 + weight.to(wide)
        out = norm(hidden_states, weight, getattr(self, eps_attr))
        # a torch whose rms_norm promotes with the weight's dtype returns the wider one
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)

    return forward


_CODE_FLAGS = 0x04 | 0x08 | 0x20 | 0x80 | 0x100 | 0x200  # varargs, varkw, generator, coroutine, async


def _fingerprint(fn):
    """What a function computes, as far as its code says: bytecode, constants (docstring
    aside), names, argument counts and defaults. None for anything but a plain function."""
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    consts = code.co_consts
    if fn.__doc__ is not None and consts and consts[0] == fn.__doc__:
        consts = (None, *consts[1:])
    return (code.co_code, consts, code.co_names, code.co_argcount, code.co_posonlyargcount,
            code.co_kwonlyargcount, code.co_flags & _CODE_FLAGS, fn.__defaults__, fn.__kwdefaults__)


# The semantics pin's input: three rows of 8 (moderate with a nonzero mean, one small next to
# eps, one large) and a weight with both signs, so that a different scale, offset, mean, eps
# placement or dtype rule shows; and (input, weight) dtypes where Llama's and Olmo2's rules
# give different output dtypes.
_PIN_HIDDEN = 8
_PIN_EPS = 0.0625
_PIN_DTYPES = ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16))


def _pin_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.linspace(-1.0, 2.5, _PIN_HIDDEN, dtype=torch.float64)
    x = torch.stack([base * 1.37, base.flip(0) * 0.061, base * -29.3])
    weight = torch.linspace(-0.75, 1.25, _PIN_HIDDEN, dtype=torch.float64)
    return x, weight


def _pin_tolerance(*dtypes: torch.dtype) -> float:
    """A relative bound on the gap between the reference (float32 math, rounded to `dtypes` on
    the way) and the adapter's formula (float64, rounded once to the output dtype)."""
    coarsest = max(torch.finfo(d).eps for d in dtypes)
    return 2 * coarsest + 8 * torch.finfo(torch.float32).eps


class _Family:
    """An RMSNorm family: the transformers class `reference` (a dotted path) whose `methods`
    define membership by their code, and `forward`, its replacement on tritonops.rms_norm, made
    by `make_forward(eps_attr, norm)` from the attribute holding eps and an rms_norm."""

    def __init__(self, name: str, reference: str, methods: tuple[str, ...], eps_attr: str, make_forward):
        self.name = name
        self.reference = reference
        self.methods = methods
        self.forward = make_forward(eps_attr, _rms_norm)
        self._float64_forward = make_forward(eps_attr, _float64_rms_norm)  # the same formula, for the pin
        self._eps_attr = eps_attr
        self._lock = threading.Lock()
        self._loaded = False
        self._reference_cls = None
        self._fingerprints = None  # method -> fingerprint, None once the reference is unavailable
        self._usable = None  # the semantics pin's verdict, once taken

    def fingerprints(self) -> dict | None:
        """The live reference's methods' fingerprints (cached), or None where the reference
        class or a method of it is missing or not plain Python. Imports its module once."""
        if not self._loaded:
            # the import outside our lock: it takes the import system's own
            cls, fingerprints = self._load()
            with self._lock:
                if not self._loaded:
                    self._reference_cls, self._fingerprints, self._loaded = cls, fingerprints, True
        return self._fingerprints

    def _load(self):
        module, _, name = self.reference.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None, None
        fingerprints = {m: _fingerprint(getattr(cls, m, None)) for m in self.methods}
        if not isinstance(cls, type) or None in fingerprints.values():
            return None, None
        return cls, fingerprints

    def matches(self, cls: type) -> bool:
        fingerprints = self.fingerprints()
        return fingerprints is not None and all(_fingerprint(getattr(cls, m, None)) == fp
                                                for m, fp in fingerprints.items())

    def usable(self) -> bool:
        """Whether the reference exists and computes what `forward` does (checked once; a
        reference that computes otherwise warns once)."""
        if self.fingerprints() is None:
            return False
        with self._lock:
            if self._usable is None:
                why = self._pin_failure()
                self._usable = why is None
                if why is not None:
                    warnings.warn(f"tritonops: not adapting the {self.name} RMSNorm family: {self.reference} {why}; "
                                  "its members keep their own forward", stacklevel=4)
            return self._usable

    def _pin_failure(self) -> str | None:
        """None if the reference class, on a tiny input in each of _PIN_DTYPES, gives the
        adapter's output dtype and shape and values within rounding of its formula; else why not."""
        try:
            with torch.no_grad(), torch.autocast("cpu", enabled=False), torch.device("cpu"):
                x64, w64 = _pin_tensors()
                for x_dtype, w_dtype in _PIN_DTYPES:
                    module = self._build_reference(w64.to(w_dtype))
                    x = x64.to(x_dtype)
                    theirs = module(x)
                    ours = self._float64_forward(module, x)
                    combo = f"for a {x_dtype} input and a {w_dtype} weight"
                    if not isinstance(theirs, torch.Tensor):
                        return f"returns {type(theirs).__name__}, not a tensor, {combo}"
                    if theirs.dtype != ours.dtype or theirs.shape != ours.shape:
                        return (f"gives {theirs.dtype} {tuple(theirs.shape)} where the adapter gives "
                                f"{ours.dtype} {tuple(ours.shape)}, {combo}")
                    rtol = _pin_tolerance(x_dtype, ours.dtype)
                    gap = (theirs.double() - ours.double()).abs() - rtol * ours.double().abs()
                    if not bool((gap <= 1e-6).all()):
                        return f"computes other values than the adapter's formula {combo}"
        except Exception as e:  # a reference that cannot be built or run here is not one we can vouch for
            return f"could not be checked ({type(e).__name__}: {e})"
        return None

    def _build_reference(self, weight: torch.Tensor) -> torch.nn.Module:
        """The reference class as (hidden size, eps) builds it, else bare with weight and eps set;
        its weight `weight`."""
        cls = self._reference_cls
        try:
            module = cls(_PIN_HIDDEN, _PIN_EPS)
        except TypeError:  # a constructor that wants a config
            module = cls.__new__(cls)
            torch.nn.Module.__init__(module)
            setattr(module, self._eps_attr, _PIN_EPS)  # where the adapter reads it
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        return module.eval()


_FAMILIES = (
    _Family("llama", "transformers.models.llama.modeling_llama.LlamaRMSNorm", ("forward",),
            "variance_epsilon", _weight_then_input_dtype),
    _Family("gemma", "transformers.models.gemma.modeling_gemma.GemmaRMSNorm", ("forward", "_norm"),
            "eps", functools.partial(_input_dtype, one_plus=True)),
    _Family("olmo2", "transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm", ("forward",),
            "variance_epsilon", _input_dtype),
    _Family("llama4", "transformers.models.llama4.modeling_llama4.Llama4TextRMSNorm", ("forward", "_norm"),
            "eps", _weight_then_input_dtype),
)

_adapters: dict[type, type | None] = {}
_adapters_lock = threading.Lock()


def _may_look_up_references(cls: type) -> bool:
    """Whether `cls` may be compared with the reference classes: importing one costs
    seconds where transformers is not loaded, and a class outside it cannot need it."""
    return str(getattr(cls, "__module__", None)).startswith("transformers.") or "transformers" in sys.modules


def _family(cls: type) -> str | None:
    """The name of the RMSNorm family ("llama", "gemma", "olmo2", "llama4") whose code `cls` runs, or
    None (also for a family whose reference is missing or fails the semantics pin)."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or "_tritonops_base" in cls.__dict__ \
            or not _may_look_up_references(cls):
        return None
    fam = next((f for f in _FAMILIES if f.matches(cls)), None)
    return fam.name if fam is not None and fam.usable() else None


def _adapted_new(base: type):
    """Unpickling (and deepcopy) of an adapted module: the adapter of its original class here,
    or the original class where this process has none."""
    cls = norm_class(base) or base
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    # the adapter class is made at run time and cannot be pickled by name: pickle the
    # original class, and adapt it again when loading
    reduced = self._tritonops_base.__reduce_ex__(self, protocol)
    if isinstance(reduced, tuple) and reduced and getattr(reduced[0], "__name__", "") == "__newobj__":
        return (_adapted_new, (self._tritonops_base,), *reduced[2:])
    return reduced


def norm_class(cls: type) -> type | None:
    """The tritonops subclass to swap in for a transformers norm class, or None if `cls` is not one.

    The subclass of `cls` changes only forward (and pickles as `cls`, adapted again when
    loaded): parameters, state_dict keys, hooks and isinstance stay. Its forward runs
    tritonops.rms_norm with the original's output dtype; it computes in float32 (float64 for
    float64 inputs, where the original computes in float32) and rounds once.
    Never imports transformers: a class outside it, while it is not loaded, is not one.
    """
    with _adapters_lock:
        if cls in _adapters:
            return _adapters[cls]
    if not _may_look_up_references(cls):
        return None  # not cached: once transformers is loaded, such a class may be a member
    name = _family(cls)
    adapter = None
    if name is not None:
        fam = next(f for f in _FAMILIES if f.name == name)
        adapter_name = f"Tritonops{cls.__name__}"
        adapter = type(cls)(adapter_name, (cls,), {
            "__module__": __name__,
            "__qualname__": adapter_name,
            "__doc__": f"{cls.__module__}.{cls.__qualname__} ({name} family) with forward on tritonops.rms_norm.",
            "forward": fam.forward,
            "__reduce_ex__": _reduce_ex,
            "_tritonops_base": cls,
        })
    with _adapters_lock:
        return _adapters.setdefault(cls, adapter)
