"""Dask orchestration over zarr stores: the out-of-core path of the same core kernels."""
