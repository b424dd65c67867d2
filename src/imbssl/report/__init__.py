"""Result tables and figures."""
from imbssl.report.plots import (plot_class_distributions, plot_cluster_sizes, plot_clusters_pca, plot_confusion,
                                 plot_per_class_accuracy, plot_prior_fit, plot_sorted_sizes)
from imbssl.report.tables import (Paired, format_mean_std, markdown_table, mean_std, paired_difference, verdict,
                                  verdict_cell)

__all__ = ["Paired", "format_mean_std", "markdown_table", "mean_std", "paired_difference", "plot_class_distributions",
           "plot_cluster_sizes", "plot_clusters_pca", "plot_confusion", "plot_per_class_accuracy", "plot_prior_fit",
           "plot_sorted_sizes", "verdict", "verdict_cell"]
