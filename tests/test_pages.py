"""llama.kernels.pages: large CPU tensors moved into 2 MB pages keep their values, their Parameters and their
sharing; nothing moves where the system has no transparent huge pages."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from llama.kernels import pages
from llama.model.layers import stack_rows

needs_thp = pytest.mark.skipif(not pages.available(), reason="this system gives no transparent huge pages")


@needs_thp
def test_empty_is_aligned_to_huge_pages_and_lives_as_long_as_its_views():
    t = pages.empty(3 << 20, torch.bfloat16)  # 6 MB
    assert t.shape == (3 << 20,) and t.dtype == torch.bfloat16 and t.data_ptr() % pages.HUGE_PAGE == 0
    t.fill_(1.5)
    view = t[100:110]
    del t
    gc.collect()
    assert torch.equal(view, torch.full((10,), 1.5, dtype=torch.bfloat16))


@needs_thp
def test_moving_a_module_keeps_values_parameters_and_sharing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048, bias=True), nn.Linear(2048, 1024, bias=False))
    model[1].weight = nn.Parameter(model[0].weight.t().contiguous())
    model.register_buffer("table", torch.randn(1024, 1024))
    tied = nn.Linear(1024, 1024, bias=False)
    tied.weight = nn.Parameter(model.table.view(1024, 1024))  # shares the buffer's storage: must keep sharing it
    model.append(tied)
    before = {name: t.clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    params = {name: p for name, p in model.named_parameters()}
    x = torch.randn(3, 1024)
    expected = model(x)
    moved = pages.move_to_huge_pages(model)
    assert moved == 2 * 2048 * 1024 * 4  # the two 8 MB weights; the biases are small, the shared pair stays
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(t, before[name]), name
    assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameter objects
    assert model[0].weight.data_ptr() % pages.HUGE_PAGE == 0 and model[1].weight.data_ptr() % pages.HUGE_PAGE == 0
    assert tied.weight.data_ptr() == model.table.data_ptr()
    assert torch.equal(model(x), expected)
    assert pages.move_to_huge_pages(model) == 0  # moved tensors stay where they are


def test_nothing_moves_without_transparent_huge_pages(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(pages, "THP_SETTING", setting)
    assert not pages.available()
    layer = nn.Linear(1024, 2048)
    ptr = layer.weight.data_ptr()
    assert pages.move_to_huge_pages(layer) == 0 and layer.weight.data_ptr() == ptr
    monkeypatch.setattr(pages, "THP_SETTING", tmp_path / "missing")
    assert not pages.available()
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(pages, "THP_SETTING", setting)
    assert pages.available()
    monkeypatch.delattr(pages.mmap, "MADV_HUGEPAGE")  # a system whose Python has no madvise for it (not Linux)
    assert not pages.available()


def test_stacked_rows_equal_the_concatenation():
    parts = [torch.randn(n, 512).bfloat16() for n in (1024, 512, 512)]
    stacked = stack_rows(parts)
    assert torch.equal(stacked, torch.cat(parts)) and stacked.shape == (2048, 512)
    if pages.available():
        assert stacked.data_ptr() % pages.HUGE_PAGE == 0
