"""Evaluation of frozen representations: features, labelled split, linear probe, kNN, metrics, clusters and their
sizes."""
from imbssl.eval.clusters import (check_cluster_count, cluster_report, cluster_statistics, feature_clusters, nmi, purity, relative_sizes,
                                  size_profile)
from imbssl.eval.features import extract_features
from imbssl.eval.knn import knn_predict, knn_scores
from imbssl.eval.labelled import (balanced_labelled_split, few_shot_set, held_out_validation, shots_per_class,
                                  split_per_class)
from imbssl.eval.linear import LinearProbeResult, linear_probe
from imbssl.eval.metrics import accuracy_report, balanced_accuracy

__all__ = [
    "LinearProbeResult",
    "accuracy_report",
    "balanced_accuracy",
    "balanced_labelled_split",
    "check_cluster_count",
    "cluster_report",
    "cluster_statistics",
    "extract_features",
    "feature_clusters",
    "few_shot_set",
    "held_out_validation",
    "knn_predict",
    "knn_scores",
    "linear_probe",
    "nmi",
    "purity",
    "relative_sizes",
    "shots_per_class",
    "size_profile",
    "split_per_class",
]
