"""Pictures of layerscope's results (matplotlib/seaborn). Each function takes what the core computed,
draws into ``ax`` or a new figure that pyplot does not track, and returns the Figure."""

from .attention import attention_heatmap, attention_rollout_overlay
from .cam import cam_overlay
from .channels import feature_maps
from .cost import cost_breakdown
from .filters import conv_filters
from .gradients import gradient_flow
from .histogram import activation_histogram
from .over_time import activation_heatmap, module_over_time, scalars_over_time
from .parameters import parameter_breakdown

__all__ = [
    "activation_heatmap",
    "activation_histogram",
    "attention_heatmap",
    "attention_rollout_overlay",
    "cam_overlay",
    "conv_filters",
    "cost_breakdown",
    "feature_maps",
    "gradient_flow",
    "module_over_time",
    "parameter_breakdown",
    "scalars_over_time",
]
