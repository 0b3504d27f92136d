"""Analyses that read stored features: linear probes, similarity, projections, heatmap probes,
stream contributions, alignment, attribution, and the figures for all of them.

Names are imported lazily (PEP 562), so ``import probes`` is instant and never pulls in torch,
matplotlib or umap until a name that needs them is used.
"""
from __future__ import annotations

from model.lazy import lazy_exports

_EXPORTS = {
    "linear": ["probe_matrix", "probe", "ProbeMatrix", "ProbeResult", "grouped_kfold", "control_labels",
               "detect_task", "batched_lbfgs", "DEFAULT_CS", "resolve_device"],
    "estimator": ["LinearProbe"],
    "similarity": ["cka", "linear_cka", "minibatch_cka", "cka_matrix", "split_global", "token_cosine_map",
                   "difference_maps", "pairwise_stream_cka"],
    "projection": ["pca_rgb", "pca_rgb_many", "PcaRgb", "otsu_threshold", "embed_2d", "Embedding"],
    "contributions": ["shapley_values", "shapley_from_table", "ShapleyResult"],
    "heatmap": ["DeconvHead", "JointsMSELoss", "gaussian_targets", "decode_heatmaps", "flip_back", "flip_test",
                "pck", "train_heatmap_probe", "to_heatmap_coords", "to_image_coords"],
    "plots": ["save", "plot_probe_matrix", "plot_regularisation_curve", "plot_confusion", "plot_cka_matrix",
              "plot_pca_rgb_grid", "plot_difference_maps", "plot_embedding", "plot_umap", "plot_shapley",
              "plot_loss_curves", "plot_attribution_overlay", "plot_pck_bars"],
    "alignment": ["text_features", "alignment_curve", "alignment_by_stream", "alignment_table", "clip_loss"],
    "attribution": ["AnswerScore", "ProbeScore", "pixel_attribution", "stream_attribution", "attribute_answer"],
    "streams": ["stream_shapley", "subset_metrics", "cache_streams"],
}
_SUBMODULES = ("linear", "similarity", "projection", "contributions", "heatmap", "plots", "alignment",
               "attribution", "streams", "estimator", "folds", "lbfgs", "solver", "targets")
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + list(_SUBMODULES)


__getattr__, __dir__ = lazy_exports(__name__, {name: f"{__name__}.{mod}" for name, mod in _WHERE.items()},
                                    _SUBMODULES)
