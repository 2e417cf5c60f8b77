"""Denoising-path figures (visualize.py): a synthetic path with known images at its end, then a real sampler."""

import pytest
import torch
from PIL import Image

from modules.artifacts.visualize import (
    DenoisingRecorder,
    denoising_path_grid,
    path_columns,
    save_gif,
    trajectory_pca_plot,
    write_denoising_figures,
)
from modules.config import FlowArguments
from modules.networks.unet import unet_s
from modules.objectives.flow import FlowObjective
from modules.pixels import to_uint8

STEPS, PADDING = 10, 2


def straight_path(num_samples=3, channels=3, size=8, max_samples=8, seed=0):
    """Drive a recorder as a sampler would on the straight line x_t = t noise + (1 - t) x0, with x0_pred = x0."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(num_samples, channels, size, size, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    recorder = DenoisingRecorder(max_samples=max_samples)
    for i, t in enumerate(torch.linspace(1, 0, STEPS + 1)[:-1].tolist()):
        recorder(i, t, t * noise + (1 - t) * x0, x0.clone())
    return recorder, x0


def cell(grid, row, column, size, rows, columns):
    """The (C, size, size) image at (row, column) of a labelled grid; the labels take what is left, top and left."""
    top = grid.shape[1] - (rows * (size + PADDING) + PADDING)
    left = grid.shape[2] - (columns * (size + PADDING) + PADDING)
    y, x = top + PADDING + row * (size + PADDING), left + PADDING + column * (size + PADDING)
    return grid[:, y : y + size, x : x + size]


def test_recorder_keeps_first_samples_and_first_loop():
    recorder, x0 = straight_path(num_samples=5, max_samples=2)
    assert recorder.num_steps == STEPS and recorder.x_t.shape == (STEPS, 2, 3, 8, 8)
    assert recorder.ts[0] == 1.0 and recorder.x_t.dtype == torch.float32
    torch.testing.assert_close(recorder.x0_pred[-1], x0[:2])
    recorder(0, 1.0, torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))  # a second sampling loop (next batch)
    assert recorder.num_steps == STEPS
    recorder.clear()
    with pytest.raises(ValueError, match="callback=recorder"):
        denoising_path_grid(recorder)


def test_path_columns_spread_evenly_with_both_ends():
    assert path_columns(10, 8)[0] == 0 and path_columns(10, 8)[-1] == 9 and len(path_columns(10, 8)) == 8
    assert path_columns(4, 8) == [0, 1, 2, 3]
    assert path_columns(50, 2) == [0, 49]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("with_x_t", [False, True])
def test_grid_ends_on_the_final_images(channels, with_x_t):
    recorder, x0 = straight_path(channels=channels)
    grid = denoising_path_grid(recorder, num_columns=4, with_x_t=with_x_t)
    assert grid.dtype == torch.uint8 and grid.ndim == 3 and grid.shape[0] == channels
    rows_per_sample, columns = 1 + with_x_t, 4
    scale = 6  # 8 px images are enlarged by the smallest whole factor that makes them at least MIN_CELL_PX = 48
    width = scale * x0.shape[-1]
    final = to_uint8(x0).repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    first = to_uint8(recorder.x_t[0]).repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    for i in range(len(x0)):
        x0_row = i * rows_per_sample + rows_per_sample - 1
        assert torch.equal(cell(grid, x0_row, columns - 1, width, len(x0) * rows_per_sample, columns), final[i])
        if with_x_t:  # the row above holds x_t, pure noise at the first column
            assert torch.equal(cell(grid, x0_row - 1, 0, width, len(x0) * rows_per_sample, columns), first[i])
    # every cell: x_t and x0_pred of its own sample at its own column's step
    enlarge = lambda x: to_uint8(x).repeat_interleave(scale, -2).repeat_interleave(scale, -1)  # noqa: E731
    for i in range(len(x0)):
        for k, step in enumerate(path_columns(STEPS, columns)):
            at = lambda r, k=k: cell(grid, r, k, width, len(x0) * rows_per_sample, columns)  # noqa: E731
            assert torch.equal(at(i * rows_per_sample + rows_per_sample - 1), enlarge(recorder.x0_pred[step, i]))
            if with_x_t:
                assert torch.equal(at(i * rows_per_sample), enlarge(recorder.x_t[step, i]))
    top = grid.shape[1] - len(x0) * rows_per_sample * (width + PADDING) - PADDING
    left = grid.shape[2] - columns * (width + PADDING) - PADDING
    assert top > 0 and left > 0
    assert (grid[:, :top, left:] < 128).any() and (grid[:, top:, :left] < 128).any()  # t labels, row labels


def test_pca_plot_draws_paths():
    recorder, _ = straight_path(num_samples=4)
    plot = trajectory_pca_plot(recorder, size=256)
    assert plot.shape == (3, 256, 256) and plot.dtype == torch.uint8
    background = (plot == 255).all(0)
    coloured = (plot.max(0).values.int() - plot.min(0).values.int()) > 60  # the paths, not the black text and frame
    assert (~background).float().mean() > 0.01 and coloured.sum() > 200


@pytest.mark.parametrize("which, frames", [("x0_pred", STEPS), ("x_t", STEPS + 1)])
def test_gif_has_one_frame_per_step(tmp_path, which, frames):
    recorder, _ = straight_path()
    path = tmp_path / "sub" / "path.gif"
    save_gif(recorder, path, which=which, nrow=2)
    with Image.open(path) as gif:
        assert gif.n_frames == frames and gif.info["loop"] == 0
    assert [p.name for p in path.parent.iterdir()] == ["path.gif"]  # no temporary file left behind


def test_figures_from_a_real_sampler(tmp_path):
    torch.manual_seed(0)
    model = unet_s(in_channels=1, sample_size=16, base_channels=8).eval()
    torch.nn.init.normal_(model.conv_out.weight, std=0.3)  # zero at init; untrained but moving, the paths show
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    recorder = DenoisingRecorder(max_samples=2)
    with torch.no_grad():
        out = FlowObjective(FlowArguments()).sample(model, noise, num_inference_steps=4, callback=recorder)
    assert recorder.ts == [1.0, 0.75, 0.5, 0.25] and recorder.x_t.shape == (4, 2, 1, 16, 16)
    assert (recorder.x_t[-1] - recorder.x_t[0]).abs().max() > 0.1
    torch.testing.assert_close(recorder.x_t[0], noise[:2])
    torch.testing.assert_close(recorder.x0_pred[-1], out[:2])  # Euler's last step lands on its x0 estimate
    paths = write_denoising_figures(recorder, tmp_path / "figures", "flow")
    assert {p.name for p in paths.values()} == {"flow_denoising.png", "flow_trajectories.png", "flow_denoising.gif"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(p.name for p in paths.values())
    with Image.open(paths["denoising"]) as png:
        assert png.mode == "L"
    with Image.open(paths["trajectories"]) as png:
        assert png.mode == "RGB" and png.size == (512, 512)
    with Image.open(paths["animation"]) as gif:
        assert gif.n_frames == 4
