"""Clustering of feature spaces (the divide stage of the offline-clustering pipeline)."""
from imbssl.cluster.kmeans import KMeansResult, kmeans, nearest_centroid

__all__ = ["KMeansResult", "kmeans", "nearest_centroid"]
