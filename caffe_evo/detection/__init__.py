"""Object detection with DetectNet in BVLC Caffe: ground truth, clustering, metrics, the evaluation task."""
