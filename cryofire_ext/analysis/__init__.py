"""Analysis of a trained run: the latent space (`latent`: PCA, clusters), maps at latent points and the FSC
between maps (`maps`), what a run folder holds (`run`), 3D variability at fixed poses (`variability`) and the
figures (`plots`). `from cryofire_ext import analysis` gives the first three modules' public names."""

from cryofire_ext.analysis.latent import (Clustering, PCAResult, choose_k, cluster, cluster_members,
                                          load_clustering, parse_cluster_numbers, pc_traversal, pca, polyline_points,
                                          save_clustering)
from cryofire_ext.analysis.maps import (VolumeSource, eval_volumes, load_volume_source, map_fsc, read_z_points,
                                        write_maps)
from cryofire_ext.analysis.run import Run, load_run, loss_history

__all__ = ["Clustering", "PCAResult", "choose_k", "cluster", "cluster_members", "load_clustering",
           "parse_cluster_numbers", "pc_traversal", "pca", "polyline_points", "save_clustering", "VolumeSource",
           "eval_volumes", "load_volume_source", "map_fsc", "read_z_points", "write_maps", "Run", "load_run",
           "loss_history"]
