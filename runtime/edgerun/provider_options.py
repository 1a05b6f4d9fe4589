"""A bundle is data: which provider options and session settings a manifest may carry.

Provider options go straight to ONNX Runtime, and some of them are code or files rather than
tuning: TensorRT's ``trt_extra_plugin_lib_paths`` and ``trt_engine_decryption_lib_path`` load
shared libraries, CUDA's ``gpu_external_alloc`` takes a function pointer, ``trt_dump_subgraphs``
and the EP-context options write files where the process runs. So each provider has an
allow-list of pure tuning keys (precision, workspace, shape profiles, algorithm search, ...),
cache locations are accepted only to be moved under ``--cache-dir``, and anything else refuses
the bundle naming the key. Session config entries pass the same kind of list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgerun.errors import BundleError

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"

# Options that name a cache location: accepted, then moved under --cache-dir (never used as given).
CACHE_PATH_KEYS = {
    TENSORRT: frozenset({"trt_engine_cache_path", "trt_timing_cache_path"}),
    OPENVINO: frozenset({"cache_dir"}),
}

# Cache switches whose location defaults to the working directory when the path option is absent.
CACHE_ENABLE_KEYS = {
    TENSORRT: {"trt_engine_cache_enable": "trt_engine_cache_path", "trt_timing_cache_enable": "trt_timing_cache_path"},
}

# Tuning options that become part of a file name: TensorRT appends the prefix to the cache path with
# std::filesystem's append, where an absolute prefix replaces the path and '..' leaves it.
FILE_NAME_KEYS = {TENSORRT: frozenset({"trt_engine_cache_prefix"})}
_PLAIN_NAME = re.compile(r"([A-Za-z0-9_][A-Za-z0-9._-]*)?")  # empty: no prefix

TUNING_KEYS: dict[str, frozenset[str]] = {
    TENSORRT: frozenset(
        {
            "device_id",
            "trt_max_workspace_size",
            "trt_max_partition_iterations",
            "trt_min_subgraph_size",
            "trt_fp16_enable",
            "trt_bf16_enable",
            "trt_int8_enable",
            "trt_int8_use_native_calibration_table",
            "trt_dla_enable",
            "trt_dla_core",
            "trt_engine_cache_enable",
            "trt_engine_cache_prefix",
            "trt_timing_cache_enable",
            "trt_force_timing_cache",
            "trt_detailed_build_log",
            "trt_build_heuristics_enable",
            "trt_sparsity_enable",
            "trt_builder_optimization_level",
            "trt_auxiliary_streams",
            "trt_tactic_sources",
            "trt_profile_min_shapes",
            "trt_profile_max_shapes",
            "trt_profile_opt_shapes",
            "trt_cuda_graph_enable",
            "trt_context_memory_sharing_enable",
            "trt_layer_norm_fp32_fallback",
            "trt_force_sequential_engine_build",
            "trt_engine_hw_compatible",
            "trt_op_types_to_exclude",
        }
    ),
    CUDA: frozenset(
        {
            "device_id",
            "gpu_mem_limit",
            "arena_extend_strategy",
            "cudnn_conv_algo_search",
            "do_copy_in_default_stream",
            "cudnn_conv_use_max_workspace",
            "cudnn_conv1d_pad_to_nc1d",
            "enable_cuda_graph",
            "enable_skip_layer_norm_strict_mode",
            "use_tf32",
            "prefer_nhwc",
            "tunable_op_enable",
            "tunable_op_tuning_enable",
            "tunable_op_max_tuning_duration_ms",
            "use_ep_level_unified_stream",
            "fuse_conv_bias",
            "sdpa_kernel",
        }
    ),
    CPU: frozenset({"use_arena"}),
    OPENVINO: frozenset(
        {
            "device_type",
            "precision",
            "num_of_threads",
            "num_streams",
            "enable_opencl_throttling",
            "enable_qdq_optimizer",
            "disable_dynamic_shapes",
            "model_priority",
            "enable_npu_fast_compile",
        }
    ),
}

# ``SessionOptions.add_session_config_entry`` keys that only tune execution. Keys that write
# files (EP context models, optimized models) or change how the model bytes are read are not here.
SESSION_CONFIG_KEYS = frozenset(
    {
        "session.intra_op.allow_spinning",
        "session.inter_op.allow_spinning",
        "session.set_denormal_as_zero",
        "session.disable_prepacking",
        "session.use_env_allocators",
        "session.qdqisint8allowed",
        "session.enable_quant_qdq_cleanup",
        "session.disable_quant_qdq",
        "session.disable_double_qdq_remover",
        "session.x64quantprecision",
        "session.disable_aot_function_inlining",
        "session.qdq_matmulnbits_accuracy_level",
        "session.disable_cpu_ep_fallback",
        "session.dynamic_block_base",
        "session.use_device_allocator_for_initializers",
        "session.force_spinning_stop",
        "session.strict_shape_type_inference",
        "session.allow_released_opsets_only",
        "mlas.enable_gemm_fastmath_arm64_bfloat16",
    }
)


def check_provider_options(provider: str, options: Mapping[str, Any], where: str) -> None:
    """Refuse any option of ``provider`` that is not pure tuning or a cache location."""
    allowed = TUNING_KEYS.get(provider, frozenset()) | CACHE_PATH_KEYS.get(provider, frozenset())
    for key in options:
        if key not in allowed:
            raise BundleError(
                f"{where}: provider option '{key}' of {provider} is not allowed in a bundle (a bundle may set "
                f"only tuning options{'' if allowed else '; this provider takes none'}); rebuild the bundle without it"
            )
        if key in FILE_NAME_KEYS.get(provider, ()) and not _PLAIN_NAME.fullmatch(str(options[key])):
            raise BundleError(
                f"{where}: provider option '{key}' of {provider} must be a plain name (letters, digits, '.', '_', "
                f"'-'; no path), got {str(options[key])!r}; rebuild the bundle with a plain name"
            )


def check_session_config(config: Mapping[str, Any], where: str) -> None:
    for key in config:
        if key not in SESSION_CONFIG_KEYS:
            raise BundleError(
                f"{where}: session config entry '{key}' is not allowed in a bundle (only execution tuning "
                f"entries are); rebuild the bundle without it"
            )


def check_manifest(manifest) -> None:
    """Every provider option and session setting of a manifest passes the allow-lists."""
    for spec in manifest.providers:
        check_provider_options(spec.name, spec.options, "manifest providers")
    for model in manifest.all_models():
        check_session_config(model.session_options.config, f"'{model.path}' session_options")
        for provider, options in model.provider_options.items():
            check_provider_options(provider, options, f"'{model.path}' provider_options")


def cache_path_keys(provider: str, options: Mapping[str, Any]) -> list[str]:
    known = CACHE_PATH_KEYS.get(provider, frozenset())
    return [key for key in options if key in known or key.endswith("_cache_path")]


def confined_cache_path(cache_dir: Path, *parts: str) -> Path:
    """``cache_dir/parts...`` with every part a plain name; refuse anything resolving outside ``cache_dir``."""
    root = Path(os.path.realpath(Path(cache_dir).expanduser()))
    clean = [
        part if part not in ("", ".", "..") and "/" not in part and "\\" not in part else "cache" for part in parts
    ]
    target = Path(os.path.realpath(root.joinpath(*clean)))
    if not target.is_relative_to(root):
        raise BundleError(f"cache path {target} resolves outside the cache directory {root}; refusing it")
    return target
