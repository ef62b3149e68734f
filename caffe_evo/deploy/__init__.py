"""After training: compaction into a smaller dense Caffe net, cost and speed measurement, export."""
