//! The plot of `realign neurons detect`: neurons per layer (x), a stacked bar per layer with
//! attention neurons (q, k, v, o; blue, bottom) under FFN neurons (gate, up, down; orange,
//! top). SVG through plotters from primitives only, with no text (plotters needs font support
//! for text; the Markdown report gives the numbers and the legend).

use std::path::Path;

use plotters::prelude::*;

use super::detect::LayerCount;
use super::NeuronError;
use crate::fsutil::write_atomic;

const W: i32 = 960;
const H: i32 = 480;
const MARGIN: i32 = 30;
const ATTENTION: RGBColor = RGBColor(31, 119, 180);
const FFN: RGBColor = RGBColor(255, 127, 14);

/// Draws the per-layer bars into `path` (SVG), atomically.
pub fn layer_plot(path: &Path, layers: &[LayerCount]) -> crate::Result<()> {
    let mut svg = String::new();
    draw(&mut svg, layers).map_err(|reason| {
        NeuronError::Invalid(format!("{}: drawing the plot: {reason}", path.display()))
    })?;
    write_atomic(path, svg.as_bytes())
}

fn draw(svg: &mut String, layers: &[LayerCount]) -> Result<(), String> {
    let root = SVGBackend::with_string(svg, (W as u32, H as u32)).into_drawing_area();
    let e = |x: DrawingAreaErrorKind<_>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let max = layers
        .iter()
        .map(|l| l.attention + l.ffn)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let (pw, ph) = ((W - 2 * MARGIN) as f64, (H - 2 * MARGIN) as f64);
    let n = layers.len().max(1) as f64;
    let py = |v: f64| H - MARGIN - (v / max * ph).round() as i32;
    let grey = RGBColor(210, 210, 210);
    for f in [0.25, 0.5, 0.75, 1.0] {
        root.draw(&PathElement::new(
            vec![(MARGIN, py(f * max)), (W - MARGIN, py(f * max))],
            grey.stroke_width(1),
        ))
        .map_err(e)?;
    }
    for (i, l) in layers.iter().enumerate() {
        let x0 = MARGIN + ((i as f64 + 0.15) / n * pw).round() as i32;
        let x1 = MARGIN + ((i as f64 + 0.85) / n * pw).round() as i32;
        let (a, f) = (l.attention as f64, l.ffn as f64);
        if l.attention > 0 {
            root.draw(&Rectangle::new(
                [(x0, py(a)), (x1, py(0.0))],
                ATTENTION.filled(),
            ))
            .map_err(e)?;
        }
        if l.ffn > 0 {
            root.draw(&Rectangle::new(
                [(x0, py(a + f)), (x1, py(a))],
                FFN.filled(),
            ))
            .map_err(e)?;
        }
    }
    root.draw(&Rectangle::new(
        [(MARGIN, MARGIN), (W - MARGIN, H - MARGIN)],
        BLACK.stroke_width(1),
    ))
    .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
