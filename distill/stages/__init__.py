"""Stage drivers that turn inputs into record files: label (and later mine, generate).

Every stage writes through `writer.write_resumable`, so all of them resume
after a kill and split their work with `--shard i/n` the same way.
"""
