"""Data layer: post records and manifests, raw-dataset readers, the synthetic set, image loading."""

from sentilens.data.records import SPLITS, Post, read_manifest, read_split, read_stats, write_manifest

__all__ = ["SPLITS", "Post", "read_manifest", "read_split", "read_stats", "write_manifest"]
