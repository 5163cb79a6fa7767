//! The similarity plot of `realign patch`: `S_j` per layer (x) for each module kind (one colour
//! and legend entry per kind, points joined by a line), the patched modules ringed in black (the
//! `patched` series). Drawn by [`crate::report`] into `similarity.svg` and `similarity.png`
//! (without text where no font is found).

use std::path::Path;

use super::patch::ModuleReport;
use crate::report::{write_chart, Chart, ChartKind, Series};
use crate::Result;

/// The chart of `modules`: kinds in order of first appearance (q, k, v, o, gate, up, down, ...),
/// side by side within a layer, then the `patched` rings.
pub(crate) fn similarity_series(modules: &[ModuleReport]) -> (Vec<Series>, Vec<(f64, String)>) {
    let mut kinds: Vec<&str> = Vec::new();
    for m in modules {
        if !kinds.contains(&m.kind.as_str()) {
            kinds.push(&m.kind);
        }
    }
    let slots = kinds.len().max(1) as f64;
    let layer = |i: usize, m: &ModuleReport| m.layer.unwrap_or(i);
    // Each layer spans [l - 0.5, l + 0.5); kind k sits at its (k + 0.5)-th slot.
    let x = |l: usize, kind: usize| l as f64 - 0.5 + (kind as f64 + 0.5) / slots;
    let mut series: Vec<Series> = kinds
        .iter()
        .enumerate()
        .map(|(ki, kind)| {
            let mut points: Vec<(f64, f64)> = modules
                .iter()
                .enumerate()
                .filter(|(_, m)| m.kind == *kind)
                .map(|(i, m)| (x(layer(i, m), ki), m.similarity))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series::line(*kind, points)
        })
        .collect();
    let patched: Vec<(f64, f64)> = modules
        .iter()
        .enumerate()
        .filter(|(_, m)| m.patched)
        .map(|(i, m)| {
            let ki = kinds.iter().position(|k| *k == m.kind).unwrap_or(0);
            (x(layer(i, m), ki), m.similarity)
        })
        .collect();
    series.push(Series::rings("patched", patched));
    let layers = modules
        .iter()
        .enumerate()
        .map(|(i, m)| layer(i, m))
        .max()
        .map_or(0, |l| l + 1);
    let ticks = (0..layers).map(|l| (l as f64, l.to_string())).collect();
    (series, ticks)
}

/// Draws the plot into `stem.svg` and `stem.png`, atomically.
pub(crate) fn similarity_plot(stem: &Path, modules: &[ModuleReport]) -> Result<()> {
    let (series, ticks) = similarity_series(modules);
    let chart = Chart {
        title: "NLSR: similarity S per layer and module (Eq. 8)",
        x_label: "layer",
        y_label: "similarity S",
        kind: ChartKind::Lines,
        series: &series,
        x_ticks: Some(&ticks),
    };
    write_chart(stem, &chart).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(layer: usize, kind: &str, similarity: f64, patched: bool) -> ModuleReport {
        ModuleReport {
            module: format!("model.layers.{layer}.self_attn.{kind}"),
            layer: Some(layer),
            kind: kind.to_string(),
            similarity,
            rank: 0,
            probability: None,
            draw: None,
            patched,
            mask_density_a: 0.0,
            mask_density_b: 0.0,
            mask_density: 0.0,
        }
    }

    #[test]
    fn one_series_per_kind_then_the_patched_rings() {
        let modules = [
            module(1, "q_proj", 0.2, false),
            module(0, "q_proj", 0.9, true),
            module(0, "v_proj", 0.5, false),
            module(1, "v_proj", 0.4, true),
        ];
        let (series, ticks) = similarity_series(&modules);
        let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["q_proj", "v_proj", "patched"]);
        // Two kinds share each layer: q at l - 0.25, v at l + 0.25, in layer order.
        assert_eq!(series[0].points, [(-0.25, 0.9), (0.75, 0.2)]);
        assert_eq!(series[1].points, [(0.25, 0.5), (1.25, 0.4)]);
        assert_eq!(series[2].style, crate::report::SeriesStyle::Rings);
        assert_eq!(series[2].points, [(-0.25, 0.9), (1.25, 0.4)]);
        assert_eq!(ticks, [(0.0, "0".to_string()), (1.0, "1".to_string())]);
    }
}
