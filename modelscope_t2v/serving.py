"""OUTPUT_VIDEO for both kinds of ModelScope client: a path for scripts, the mp4's bytes for serving.

The model card, the Studio app and most scripts print OUTPUT_VIDEO, move it or
hand it to `gr.Video`: a path. ModelScope declares the key as `bytes`, and its
serving helpers (`pipeline_output_to_service_base64_output`, what `modelscope
server` runs) base64-encode the value, which fails on a str. So the pipeline
returns a VideoFile, a str that is the path, and `register()` teaches those
helpers to encode a VideoFile as the file's bytes, as they encode the built-in's
bytes. A file the pipeline made in the temp folder is removed once encoded,
as the built-in removes its own.
"""

from __future__ import annotations

import os


class VideoFile(str):
    """The path of a written video; `temporary` when the pipeline chose it (no output_video given)."""

    def __new__(cls, path: str, temporary: bool = False):
        file = super().__new__(cls, path)
        file.temporary = temporary
        return file

    def read_bytes(self) -> bytes:
        with open(self, 'rb') as f:
            return f.read()


def encoding_video_files(encode):
    """ModelScope's base64 encoder `encode`, taking a VideoFile as the bytes of its file."""

    def encode_value(value):
        if not isinstance(value, VideoFile):
            return encode(value)
        data = value.read_bytes()
        if value.temporary:
            os.remove(value)   # served: nobody else knows the temporary file
        return encode(data)

    encode_value.reads_video_files = True
    return encode_value


def register() -> None:
    """Wrap the encoders ModelScope's serving helpers use for OUTPUT_VIDEO ('bytes'; 'pcm' for a list)."""
    from modelscope.utils import input_output
    encoders = input_output.base64_encoder_map
    for kind in ('bytes', 'pcm'):
        if not getattr(encoders[kind], 'reads_video_files', False):
            encoders[kind] = encoding_video_files(encoders[kind])
