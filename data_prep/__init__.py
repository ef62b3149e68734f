"""Dataset converters: official raw formats in, Caffe ``Datum`` LMDBs out (uint8, CHW, BGR for colour).

Each converter checks its input (magic numbers, sizes, checksums) before writing anything and writes the
dataset directory atomically, so a bad input leaves no LMDB behind.
"""
