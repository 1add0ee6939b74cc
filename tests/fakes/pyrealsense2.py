"""Test double of pyrealsense2 (librealsense's Python binding), enough for a color (+ depth) pipeline.

Mimics: rs.pipeline() / rs.config(), config.enable_stream(stream, w, h, format, fps) validated against D435i
modes at start() ("Couldn't resolve requests" otherwise), enable_device(serial), start() returning a profile,
wait_for_frames(timeout_ms) blocking until the next frame and raising RuntimeError on timeout, framesets with
get_color_frame() / get_depth_frame() (falsy when that stream is off), frame.get_data() readable through the
buffer protocol (np.asanyarray -> (H, W, 3) uint8 or (H, W) uint16), get_timestamp() (ms), get_frame_number(),
pipeline.stop(). Time comes from the module's `clock` / `sleep` (tests swap in a fake clock). Fault injection
(not part of the API): DEVICES[serial]["unplugged"] (frames stop: timeouts), ["frozen"] (the last frame is
delivered again and again, as a stuck driver would).
"""
import time

import numpy as np

clock, sleep = time.monotonic, time.sleep
DEVICES = {"238122070001": {"unplugged": False, "frozen": False}}  # serial -> fault knobs
COLOR_MODES = {(1920, 1080): (6, 15, 30), (1280, 720): (6, 15, 30), (960, 540): (6, 15, 30, 60),
               (848, 480): (6, 15, 30, 60), (640, 480): (6, 15, 30, 60), (640, 360): (6, 15, 30, 60),
               (424, 240): (6, 15, 30, 60), (320, 240): (6, 30, 60), (320, 180): (6, 30, 60)}
DEPTH_MODES = {(1280, 720): (6, 15, 30), (848, 480): (6, 15, 30, 60, 90), (640, 480): (6, 15, 30, 60, 90),
               (640, 360): (6, 15, 30, 60, 90), (480, 270): (6, 15, 30, 60, 90), (424, 240): (6, 15, 30, 60, 90)}


class stream:
    any, depth, color, infrared = 0, 1, 2, 3


class format:
    any, z16, rgb8, bgr8, rgba8, bgra8 = 0, 1, 5, 6, 7, 8


class camera_info:
    name, serial_number = 0, 1


class config:
    def __init__(self):
        self.streams, self.serial = {}, None

    def enable_stream(self, stream_type, width, height, format, framerate):
        self.streams[stream_type] = (width, height, format, framerate)

    def enable_device(self, serial):
        self.serial = serial


class frame:
    def __init__(self, data=None, number=0, stamp_ms=0.0):
        self._data, self._number, self._stamp = data, number, stamp_ms

    def __bool__(self):
        return self._data is not None

    def get_data(self):
        if self._data is None:
            raise RuntimeError("null pointer passed for argument \"frame_ref\"")
        return memoryview(self._data)  # real: a BufData object exposing the buffer protocol

    def get_timestamp(self):
        return self._stamp

    def get_frame_number(self):
        return self._number

    def get_width(self):
        return self._data.shape[1]

    def get_height(self):
        return self._data.shape[0]


class video_frame(frame):
    pass


class depth_frame(video_frame):
    def get_distance(self, x, y):
        return float(self._data[y, x]) * 0.001


class composite_frame(frame):
    def __init__(self, frames, number, stamp_ms):
        super().__init__(np.zeros(0), number, stamp_ms)
        self._frames = frames

    def get_color_frame(self):
        return self._frames.get(stream.color, video_frame())

    def get_depth_frame(self):
        return self._frames.get(stream.depth, depth_frame())

    def size(self):
        return len(self._frames)


class device:
    def __init__(self, serial):
        self.serial = serial

    def get_info(self, info):
        return self.serial if info == camera_info.serial_number else "Intel RealSense D435I"


class pipeline_profile:
    def __init__(self, serial):
        self._device = device(serial)

    def get_device(self):
        return self._device


class pipeline:
    def __init__(self, ctx=None):
        self.cfg, self.t0, self.last = None, None, None

    def start(self, config=None):
        if self.cfg is not None:
            raise RuntimeError("start() cannot be called before stop()")
        config = config or _default_config()
        serial = config.serial or next(iter(DEVICES), None)
        if serial not in DEVICES:
            raise RuntimeError("No device connected" if config.serial is None else f"No device with serial {serial}")
        for s, (w, h, fmt, fps) in config.streams.items():
            modes = COLOR_MODES if s == stream.color else DEPTH_MODES
            formats = (format.rgb8, format.bgr8, format.rgba8, format.bgra8) if s == stream.color else (format.z16,)
            ok_fmt = fmt in formats
            if fps not in modes.get((w, h), ()) or not ok_fmt:
                raise RuntimeError("Couldn't resolve requests")
        self.cfg, self.serial, self.t0, self.last = config, serial, clock(), -1
        return pipeline_profile(serial)

    def wait_for_frames(self, timeout_ms=5000):
        if self.cfg is None:
            raise RuntimeError("wait_for_frames cannot be called before start()")
        knobs = DEVICES[self.serial]
        if knobs["unplugged"]:
            sleep(timeout_ms / 1000.0)
            raise RuntimeError(f"Frame didn't arrive within {timeout_ms}")
        fps = max(v[3] for v in self.cfg.streams.values())
        n = self.last if knobs["frozen"] and self.last >= 0 else self.last + 1
        if n > self.last:
            due = self.t0 + n / fps
            if clock() < due:
                sleep(due - clock())  # block until the next frame is out
            n = max(n, int((clock() - self.t0) * fps))  # the queue holds only the latest frame
        self.last = n
        stamp = (self.t0 + n / fps) * 1000.0
        frames = {}
        for s, (w, h, fmt, _) in self.cfg.streams.items():
            if s == stream.color:
                img = np.zeros((h, w, 3 if fmt in (format.rgb8, format.bgr8) else 4), np.uint8)
                img[..., 0] = (n * 7) % 256  # red changes with the frame number (blue if bgr8)
                img[:, : w // 2, 1] = 200
                if fmt in (format.bgr8, format.bgra8):
                    img[..., [0, 2]] = img[..., [2, 0]]
                frames[s] = video_frame(img, n, stamp)
            else:
                frames[s] = depth_frame(np.full((h, w), 500 + n, np.uint16), n, stamp)
        return composite_frame(frames, n, stamp)

    def stop(self):
        if self.cfg is None:
            raise RuntimeError("stop() cannot be called before start()")
        self.cfg = None


def _default_config():
    c = config()
    c.enable_stream(stream.depth, 848, 480, format.z16, 30)
    c.enable_stream(stream.color, 640, 480, format.rgb8, 30)
    return c
