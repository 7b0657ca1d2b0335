"""The CLIP backbone layer over open_clip, one module per concern:
`loading` (models and weights), `checkpoints` (checkpoint files, one-line problems), `released` (Eslami & de Melo's released checkpoint
layouts, `hf-hub:` names from the cache), `transforms` (CLIP preprocessing), `text`
(templates, text classifiers), `taps` (attention taps, D-V branch, spatial tokens)."""
from algorithms.backbone.checkpoints import (CHECKPOINT_SUFFIXES, MODEL_CONFIG_DIR,
                                             CheckpointError, checkpoint_problem, load_checkpoint)
from algorithms.backbone.loading import (DEFAULT_MODEL, DEFAULT_PRETRAINED, check_model_name,
                                         image_size_of, load_clip, register_model_configs,
                                         tag_uses_quick_gelu)
from algorithms.backbone.taps import (DV_MODES, ImageTaps, VisionTransformer,
                                      attention_pool_all_queries, encode_image_taps,
                                      encode_image_tokens)
from algorithms.backbone.text import TEMPLATE_SETS, resolve_templates, text_classifier
from algorithms.backbone.transforms import clip_transform

__all__ = ["CHECKPOINT_SUFFIXES", "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "MODEL_CONFIG_DIR",
           "CheckpointError", "check_model_name", "checkpoint_problem", "load_checkpoint",
           "image_size_of", "load_clip", "register_model_configs", "tag_uses_quick_gelu",
           "DV_MODES", "ImageTaps", "VisionTransformer", "attention_pool_all_queries",
           "encode_image_taps", "encode_image_tokens", "TEMPLATE_SETS", "resolve_templates",
           "text_classifier", "clip_transform"]
