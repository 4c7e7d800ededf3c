"""Networks: timm backbones, the CAM classifier, the segmenter (segmentation_models_pytorch)."""
