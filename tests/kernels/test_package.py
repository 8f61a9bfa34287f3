"""The kernels package: `import kernels.<module>` yields the module (no exported op hides one), and
no two of its modules define a public function or kernel under the same name."""

import importlib
import pkgutil
import types

from qwen_vl_triton import kernels

MODULES = sorted(m.name for m in pkgutil.iter_modules(kernels.__path__))


def test_no_export_shadows_a_module():
    for name in MODULES:
        module = importlib.import_module(f"qwen_vl_triton.kernels.{name}")
        assert getattr(kernels, name) is module, f"qwen_vl_triton.kernels.{name} is not the module"
    assert not set(kernels.__all__) & set(MODULES)


def test_public_names_are_defined_once_across_the_package():
    owner: dict[str, str] = {}
    for name in MODULES:
        module = importlib.import_module(f"qwen_vl_triton.kernels.{name}")
        for attr, value in vars(module).items():
            # a @triton.jit kernel is a JITFunction wrapping the Python function `fn`
            defined_here = getattr(getattr(value, "fn", value), "__module__", None) == module.__name__
            if attr.startswith("_") or isinstance(value, types.ModuleType) or not defined_here:
                continue
            assert attr not in owner, f"{attr} is defined in both kernels.{owner[attr]} and kernels.{name}"
            owner[attr] = name
    assert {"attend_kv_tile", "query_block_table", "rows_per_tile", "last_dim_contiguous"} <= owner.keys()
