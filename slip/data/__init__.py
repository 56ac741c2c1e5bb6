"""Data handling for slip: webdataset shard writing, corpus converters and the synthetic corpus.

Submodules are imported explicitly (``slip.data.shards``, ``slip.data.sources``,
``slip.data.synthetic``, ``slip.data.make_shards``, ``slip.data.pipeline``) so that importing the
package stays cheap; nothing heavy is imported here on purpose.
"""
