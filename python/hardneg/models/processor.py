"""The LLaVA-OneVision processor for image and text inputs only.

transformers' LlavaOnevisionProcessor insists on a video processor, and every video processor needs
torchvision, which hardneg does not depend on (images go through the PIL image processor,
LlavaOnevisionImageProcessorPil). This subclass drops the video_processor attribute and nothing
else: prompt expansion, image-token counting and save/load are transformers' own code.
"""

from __future__ import annotations

from transformers import LlavaOnevisionProcessor


class LlavaOnevisionImageTextProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor with an image processor and a tokenizer, no video processor."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        # The processor attributes are read from this signature (ProcessorMixin.get_attributes),
        # so leaving video_processor out of it is what removes the video processor.
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )
