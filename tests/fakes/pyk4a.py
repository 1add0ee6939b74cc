"""Test double of pyk4a 1.5 (Azure Kinect), enough for color capture.

Mimics: Config (defaults RES_720P, COLOR_BGRA32, NFOV_UNBINNED, FPS_30, synchronized_images_only=True; start()
refuses synchronized_images_only with depth off, as the SDK does), PyK4A(config, device_id).start() /
get_capture(timeout ms, -1 = forever) / stop(), captures whose .color is computed lazily as (H, W, 4) uint8
BGRA (a 1-D encoded buffer for MJPG), .depth uint16 mm, color_timestamp_usec (device clock) and
color_system_timestamp_nsec, K4AException / K4ATimeoutException. Time comes from `clock` / `sleep`. Fault
injection (not part of the API): DEVICES[id]["unplugged"] (captures time out), ["frozen"] (same capture again).
"""
import time
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

clock, sleep = time.monotonic, time.sleep
DEVICES = {0: {"unplugged": False, "frozen": False}}


class K4AException(Exception):
    pass


class K4ATimeoutException(K4AException):
    pass


class ColorResolution(IntEnum):
    OFF, RES_720P, RES_1080P, RES_1440P, RES_1536P, RES_2160P, RES_3072P = range(7)


class ImageFormat(IntEnum):
    COLOR_MJPG, COLOR_NV12, COLOR_YUY2, COLOR_BGRA32, DEPTH16, IR16, CUSTOM8, CUSTOM16, CUSTOM = range(9)


class DepthMode(IntEnum):
    OFF, NFOV_2X2BINNED, NFOV_UNBINNED, WFOV_2X2BINNED, WFOV_UNBINNED, PASSIVE_IR = range(6)


class FPS(IntEnum):
    FPS_5, FPS_15, FPS_30 = range(3)


SIZES = {ColorResolution.RES_720P: (720, 1280), ColorResolution.RES_1080P: (1080, 1920),
         ColorResolution.RES_1440P: (1440, 2560), ColorResolution.RES_1536P: (1536, 2048),
         ColorResolution.RES_2160P: (2160, 3840), ColorResolution.RES_3072P: (3072, 4096)}
DEPTH_SIZES = {DepthMode.NFOV_2X2BINNED: (288, 320), DepthMode.NFOV_UNBINNED: (576, 640),
               DepthMode.WFOV_2X2BINNED: (512, 512), DepthMode.WFOV_UNBINNED: (1024, 1024),
               DepthMode.PASSIVE_IR: (1024, 1024)}


@dataclass
class Config:
    color_resolution: ColorResolution = ColorResolution.RES_720P
    color_format: ImageFormat = ImageFormat.COLOR_BGRA32
    depth_mode: DepthMode = DepthMode.NFOV_UNBINNED
    camera_fps: FPS = FPS.FPS_30
    synchronized_images_only: bool = True
    depth_delay_off_color_usec: int = 0
    wired_sync_mode: int = 0
    subordinate_delay_off_master_usec: int = 0
    disable_streaming_indicator: bool = False


class PyK4ACapture:
    def __init__(self, config, n, t_s):
        self._config, self._n, self._color = config, n, None
        self.color_timestamp_usec = int(n * 1e6 / (5, 15, 30)[config.camera_fps])  # device clock from start
        self.color_system_timestamp_nsec = int(t_s * 1e9)

    @property
    def color(self):
        if self._config.color_resolution == ColorResolution.OFF:
            return None
        if self._color is None:  # fetched lazily, like the real capture
            h, w = SIZES[self._config.color_resolution]
            bgra = np.zeros((h, w, 4), np.uint8)
            bgra[..., 0] = (self._n * 5) % 256  # blue changes with the frame
            bgra[h // 2:, :, 2] = 180  # lower half red
            bgra[..., 3] = 255
            if self._config.color_format == ImageFormat.COLOR_BGRA32:
                self._color = bgra
            else:  # MJPG etc.: an encoded byte buffer, not an image
                self._color = np.frombuffer(b"\xff\xd8fake-jpeg\xff\xd9", np.uint8)
        return self._color

    @property
    def depth(self):
        if self._config.depth_mode == DepthMode.OFF:
            return None
        return np.full(DEPTH_SIZES[self._config.depth_mode], 800, np.uint16)  # mm


class PyK4A:
    def __init__(self, config=None, device_id=0, thread_safe=True):
        self._config, self._device_id, self.opened, self.last = config or Config(), device_id, False, None

    def start(self):
        if self._device_id not in DEVICES:
            raise K4AException(f"Cannot open device {self._device_id}")
        c = self._config
        if c.synchronized_images_only and (c.depth_mode == DepthMode.OFF or c.color_resolution == ColorResolution.OFF):
            raise K4AException("synchronized_images_only requires both color and depth cameras enabled")
        if c.camera_fps == FPS.FPS_30 and (c.color_resolution == ColorResolution.RES_3072P
                                          or c.depth_mode == DepthMode.WFOV_UNBINNED):
            raise K4AException("this mode supports at most 15 fps")
        self.opened, self.t0, self.n = True, clock(), -1

    def stop(self):
        self.opened = False

    def get_capture(self, timeout=-1):
        if not self.opened:
            raise K4AException("Device is not opened")
        knobs = DEVICES[self._device_id]
        if knobs["unplugged"]:
            sleep(timeout / 1000.0 if timeout >= 0 else 1.0)
            raise K4ATimeoutException()
        if knobs["frozen"] and self.last is not None:
            return self.last
        fps = (5, 15, 30)[self._config.camera_fps]
        due = self.t0 + (self.n + 1) / fps
        if clock() < due:
            sleep(due - clock())
        self.n = max(self.n + 1, int((clock() - self.t0) * fps))
        self.last = PyK4ACapture(self._config, self.n, clock())
        return self.last
