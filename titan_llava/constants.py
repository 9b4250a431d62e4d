"""Token-id conventions shared by the data pipeline and the model."""

# Placeholder id for one image in LLaVA token ids (the reference's IMAGE_TOKEN_INDEX). The data
# pipeline expands each placeholder to the image's exact feature count before batching, so the
# model sees one IMAGE_TOKEN_INDEX position per image feature.
IMAGE_TOKEN_INDEX = -200
# Label value that the loss ignores (torch's cross_entropy default ignore_index).
IGNORE_INDEX = -100
