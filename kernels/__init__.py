from .attention import attention_reference, flash_attention
from .cross_entropy import (fused_linear_cross_entropy, fused_linear_logprobs, linear_cross_entropy_reference,
                            linear_logprobs_reference)

import os


def _fix_interpreter_for_numpy_2_4():
    """Triton <= 3.6's CPU interpreter turns a scalar kernel argument used as an index (e.g. the bound of
    `range(0, V, BLOCK)`) into a Python int with int(array of shape (1,)), which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars", triton-lang/triton#9171, fixed
    after 3.6). Same fix as upstream's, applied to the interpreter's patch step; a no-op elsewhere."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_numpy_2_4_fix", False):
        return

    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._numpy_2_4_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _fix_interpreter_for_numpy_2_4()
