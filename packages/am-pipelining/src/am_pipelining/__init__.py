"""am-pipelining: pipeline-parallel forwards, stage splitting and schedules for Hugging Face models."""

from .buffers import init_hf_model_buffers
from .forwards import (
    create_pipeline_forward_causal_lm,
    create_pipeline_forward_gemma4_text,
    create_pipeline_forward_gemma4_vlm,
    create_pipeline_forward_inner,
    create_pipeline_forward_mistral3_vlm,
)
from .introspect import MULTIMODAL_SUFFIXES, TEXT_MODULE_ATTRS, get_text_module, model_keeps_self_forward
from .mask_cache import CausalMaskCache
from .patch import patch_hf_model_for_pp, pp_mask_cache, unpatch_hf_model_for_pp
from .schedule import SCHEDULES, PipelineRun, build_pipeline, pipeline_train_step
from .split import get_stage_plan, split_model_into_stages
from .validate import get_pipeline_problems, validate_hf_model_for_pipeline_support
from .version import __version__

__all__ = [
    "MULTIMODAL_SUFFIXES",
    "SCHEDULES",
    "TEXT_MODULE_ATTRS",
    "CausalMaskCache",
    "PipelineRun",
    "__version__",
    "build_pipeline",
    "create_pipeline_forward_causal_lm",
    "create_pipeline_forward_gemma4_text",
    "create_pipeline_forward_gemma4_vlm",
    "create_pipeline_forward_inner",
    "create_pipeline_forward_mistral3_vlm",
    "get_pipeline_problems",
    "get_stage_plan",
    "get_text_module",
    "init_hf_model_buffers",
    "model_keeps_self_forward",
    "patch_hf_model_for_pp",
    "pipeline_train_step",
    "pp_mask_cache",
    "split_model_into_stages",
    "unpatch_hf_model_for_pp",
    "validate_hf_model_for_pipeline_support",
]
