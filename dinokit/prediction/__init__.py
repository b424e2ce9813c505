"""What a prediction is and becomes: inference modes, coloured masks and overlays, videos, ONNX files;
the one argmax."""
