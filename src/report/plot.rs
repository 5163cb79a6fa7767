//! Line and bar charts written as SVG and PNG, through plotters.
//!
//! [`write_chart`] draws one [`Chart`] twice, into `stem.svg` and `stem.png`
//! ([`WIDTH`] x [`HEIGHT`] pixels, white background), each written atomically. The layout is
//! fixed: the title on top, the plot with its axis labels below it, the legend (one row per
//! named series) in a column on the right. Series take their colours from [`PALETTE`] in order;
//! [`SeriesStyle::Rings`] series are black and take none.
//!
//! Ranges come from the data: every finite point, and the tick positions of
//! [`Chart::x_ticks`]; points with a NaN or infinite coordinate are skipped (a line is broken
//! there). An empty chart, a single point or a constant series get a unit-wide range.
//!
//! # Fonts
//!
//! Text (title, axis labels, tick labels, legend) is drawn with the first TrueType/OpenType font
//! that loads from, in order: the file named by `$REALIGN_FONT`; DejaVu Sans, then Liberation
//! Sans, where Debian, Ubuntu, Fedora, Arch and Alpine install them (and Arial on macOS and
//! Windows); any `*.ttf` found under `/usr/share/fonts` and `/usr/local/share/fonts` (sans-serif
//! regular faces first). The font is read once per process and registered with plotters as
//! `sans-serif`; nothing is shipped with the crate. `REALIGN_FONT=none` turns text off.
//!
//! With no font, the same charts are drawn with no text at all (no title, labels or legend:
//! the data, grid and tick marks only); a missing font never makes a chart fail. The SVG names
//! the font family only (`sans-serif`): a viewer draws its text with its own fonts.
//!
//! ```no_run
//! use realign::report::{write_chart, Chart, ChartKind, Series};
//! let series = [
//!     Series::line("train", vec![(0.0, 2.1), (1.0, 1.4), (2.0, 1.1)]),
//!     Series::line("eval", vec![(0.0, 2.3), (2.0, 1.5)]),
//! ];
//! let chart = Chart {
//!     title: "Loss",
//!     x_label: "epoch",
//!     y_label: "loss",
//!     kind: ChartKind::Lines,
//!     series: &series,
//!     x_ticks: None,
//! };
//! let files = write_chart("out/loss".as_ref(), &chart)?; // out/loss.svg, out/loss.png
//! # Ok::<(), realign::Error>(())
//! ```

use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use super::ReportError;
use crate::fsutil::write_atomic;
use crate::Result;

/// Width of every chart, in pixels (the SVG's width, the PNG's columns).
pub const WIDTH: u32 = 960;
/// Height of every chart, in pixels.
pub const HEIGHT: u32 = 540;

/// The series colours, in order (matplotlib's `tab10`); the 11th series takes the first again.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// At most this many x tick labels are drawn; longer tick lists keep every n-th.
pub const MAX_X_TICKS: usize = 32;

/// The family name the font is registered under.
const FAMILY: &str = "sans-serif";
/// Height of the title band.
const TITLE_H: u32 = 40;
/// Margin around the plot, inside the area left of the legend.
const MARGIN: u32 = 12;
/// Height of the x label area (tick labels, then the axis label), width of the y one.
const X_LABEL_AREA: u32 = 48;
const Y_LABEL_AREA: u32 = 72;
/// Height of a legend row.
const LEGEND_ROW: i32 = 22;

/// How a series of a [`ChartKind::Lines`] chart is drawn (in a [`ChartKind::Bars`] chart every
/// series is a bar group member, whatever its style).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeriesStyle {
    /// Points joined by a line (in x order as given), each point a small dot.
    #[default]
    Line,
    /// Dots only.
    Points,
    /// Large black rings only, to mark points of other series (say, patched modules).
    Rings,
}

/// One named data series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// The legend entry; an empty name has none.
    pub name: String,
    /// The `(x, y)` points; points with a non-finite coordinate are skipped.
    pub points: Vec<(f64, f64)>,
    /// How it is drawn.
    pub style: SeriesStyle,
}

impl Series {
    /// A [`SeriesStyle::Line`] series.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self::styled(name, points, SeriesStyle::Line)
    }

    /// A [`SeriesStyle::Points`] series.
    pub fn points(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self::styled(name, points, SeriesStyle::Points)
    }

    /// A [`SeriesStyle::Rings`] series.
    pub fn rings(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self::styled(name, points, SeriesStyle::Rings)
    }

    fn styled(name: impl Into<String>, points: Vec<(f64, f64)>, style: SeriesStyle) -> Self {
        Self {
            name: name.into(),
            points,
            style,
        }
    }
}

/// What kind of chart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChartKind {
    /// Each series by its [`SeriesStyle`], on linear axes.
    #[default]
    Lines,
    /// Grouped bars from 0 to `y` at integer `x` (`x` is rounded), one bar per series side by
    /// side, in series order: per-layer counts. The x ticks default to the integers present.
    Bars,
}

/// A chart: what [`write_chart`] draws.
#[derive(Debug, Clone, Copy)]
pub struct Chart<'a> {
    /// Drawn centred on top; empty for none.
    pub title: &'a str,
    /// Under the x axis; empty for none.
    pub x_label: &'a str,
    /// Left of the y axis; empty for none.
    pub y_label: &'a str,
    /// Lines or bars.
    pub kind: ChartKind,
    /// The data, drawn in order (later series on top).
    pub series: &'a [Series],
    /// x tick labels at given positions (with a vertical grid line each) instead of the
    /// automatic ones; at most [`MAX_X_TICKS`] are drawn.
    pub x_ticks: Option<&'a [(f64, String)]>,
}

/// Writes `stem.svg` and `stem.png` atomically (temp file + rename, see
/// [`crate::fsutil::write_atomic`]) and returns both paths, SVG first.
///
/// The suffixes are appended: stem `out/run.v2` gives `out/run.v2.svg`. Both images are drawn
/// before either is written. Without a font (see the [module docs](self)) the charts have no
/// text. Errors: [`ReportError::Plot`] if drawing or PNG encoding fails, an I/O error if a file
/// cannot be written.
pub fn write_chart(stem: &Path, chart: &Chart) -> Result<Vec<PathBuf>> {
    let text = font_path().is_some();
    let svg_path = with_suffix(stem, "svg");
    let png_path = with_suffix(stem, "png");
    let svg = render_svg(chart, text).map_err(|reason| ReportError::Plot {
        file: svg_path.clone(),
        reason,
    })?;
    let png = render_png(chart, text).map_err(|reason| ReportError::Plot {
        file: png_path.clone(),
        reason,
    })?;
    write_atomic(&svg_path, svg.as_bytes())?;
    write_atomic(&png_path, &png)?;
    Ok(vec![svg_path, png_path])
}

/// The font file that chart text is drawn with, loaded on the first call (see the
/// [module docs](self)); `None`: charts are drawn without text.
pub fn font_path() -> Option<&'static Path> {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(load_font).as_deref()
}

/// Known places of a regular sans-serif face, most likely first.
const KNOWN_FONTS: [&str; 11] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", // Debian, Ubuntu
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf", // Fedora
    "/usr/share/fonts/TTF/DejaVuSans.ttf",             // Arch
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",          // Alpine, older Fedora
    "/usr/share/fonts/truetype/DejaVuSans.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf", // macOS
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Folders searched for any `*.ttf` when no known font loads.
const FONT_DIRS: [&str; 2] = ["/usr/share/fonts", "/usr/local/share/fonts"];

fn load_font() -> Option<PathBuf> {
    let env = std::env::var_os("REALIGN_FONT").filter(|v| !v.is_empty());
    if env.as_deref() == Some("none".as_ref()) {
        return None;
    }
    let first = env.map(PathBuf::from);
    let known = KNOWN_FONTS.iter().map(PathBuf::from);
    if let Some(p) = first.into_iter().chain(known).find(|p| register(p)) {
        return Some(p);
    }
    let mut found = Vec::new();
    for dir in FONT_DIRS {
        find_ttf(Path::new(dir), 0, &mut found);
    }
    // Regular sans-serif faces first, then any other face; by path within each.
    found.sort_by_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let styled = [
            "bold",
            "italic",
            "oblique",
            "light",
            "mono",
            "condensed",
            "serif",
        ]
        .iter()
        .any(|w| name.replace("sans", "").contains(w));
        (!name.contains("sans"), styled, p.clone())
    });
    found.into_iter().find(|p| register(p))
}

/// Collects `*.ttf` files under `dir`, 4 levels deep and 2000 files at most.
fn find_ttf(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if found.len() >= 2000 {
            return;
        }
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && depth < 4 {
            find_ttf(&path, depth + 1, found);
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ttf"))
        {
            found.push(path);
        }
    }
}

/// Reads and registers one font file; false if it is missing, too large or not a font. The
/// bytes of a registered font live as long as the process (plotters keeps a `'static` slice).
fn register(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.len() > 64 << 20 {
        return false;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let magic_ok = bytes.len() > 12
        && matches!(
            &bytes[..4],
            [0, 1, 0, 0] | b"true" | b"OTTO" | b"ttcf" | b"typ1"
        );
    if !magic_ok {
        return false;
    }
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
}

fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = stem.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

fn render_svg(chart: &Chart, text: bool) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart, text).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn render_png(chart: &Chart, text: bool) -> Result<Vec<u8>, String> {
    let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart, text).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(png)
}

/// The colour of each series: the palette in order, black for rings (in a line chart).
fn colours(chart: &Chart) -> Vec<RGBColor> {
    let mut next = 0;
    chart
        .series
        .iter()
        .map(|s| {
            if s.style == SeriesStyle::Rings && chart.kind == ChartKind::Lines {
                BLACK
            } else {
                next += 1;
                PALETTE[(next - 1) % PALETTE.len()]
            }
        })
        .collect()
}

fn finite(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.1.is_finite()
}

fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// `lo..hi` widened by `pad` of its span on each side (not below 0 or above 0 when `keep_zero`
/// and that bound is 0); a unit range around a single value, `0..1` for none.
fn padded(b: Option<(f64, f64)>, pad: f64, keep_zero: bool) -> Range<f64> {
    match b {
        None => 0.0..1.0,
        Some((lo, hi)) if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()).max(1.0) => {
            let half = if lo == 0.0 { 0.5 } else { 0.1 * lo.abs() };
            lo - half..hi + half
        }
        Some((lo, hi)) => {
            let d = if (hi - lo).is_finite() {
                (hi - lo) * pad
            } else {
                0.0
            };
            let lo = if keep_zero && lo == 0.0 { lo } else { lo - d };
            let hi = if keep_zero && hi == 0.0 { hi } else { hi + d };
            lo..hi
        }
    }
}

fn x_range(chart: &Chart) -> Range<f64> {
    let ticks = chart.x_ticks.unwrap_or(&[]).iter().map(|t| t.0);
    let points = chart
        .series
        .iter()
        .flat_map(|s| &s.points)
        .filter(|p| finite(p));
    match chart.kind {
        ChartKind::Lines => padded(bounds(points.map(|p| p.0).chain(ticks)), 0.03, false),
        ChartKind::Bars => match bounds(points.map(|p| p.0.round()).chain(ticks)) {
            None => -0.6..0.6,
            Some((lo, hi)) => lo - 0.6..hi + 0.6,
        },
    }
}

fn y_range(chart: &Chart) -> Range<f64> {
    let ys = chart
        .series
        .iter()
        .flat_map(|s| &s.points)
        .filter(|p| finite(p))
        .map(|p| p.1);
    match chart.kind {
        ChartKind::Lines => padded(bounds(ys), 0.08, false),
        ChartKind::Bars => padded(bounds(ys.chain([0.0])), 0.05, true),
    }
}

/// The x ticks drawn by hand: the chart's, else the integers of a bar chart; `None` for
/// plotters' automatic ticks. Thinned to [`MAX_X_TICKS`].
fn x_ticks(chart: &Chart, xr: &Range<f64>) -> Option<Vec<(f64, String)>> {
    let ticks: Vec<(f64, String)> = match (chart.x_ticks, chart.kind) {
        (Some(t), _) => t
            .iter()
            .filter(|t| t.0.is_finite() && xr.contains(&t.0))
            .cloned()
            .collect(),
        (None, ChartKind::Bars) => {
            let mut xs: Vec<f64> = chart
                .series
                .iter()
                .flat_map(|s| &s.points)
                .filter(|p| finite(p))
                .map(|p| p.0.round())
                .collect();
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            xs.into_iter().map(|x| (x, format!("{x}"))).collect()
        }
        (None, ChartKind::Lines) => return None,
    };
    let step = ticks.len().div_ceil(MAX_X_TICKS).max(1);
    Some(ticks.into_iter().step_by(step).collect())
}

fn text_style(size: f64) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font())
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Draws the whole chart on `root`; `text`: whether a font is registered.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
    text: bool,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let (title_area, body) = root.split_vertically(TITLE_H);
    if text && !chart.title.is_empty() {
        let style = text_style(22.0).pos(Pos::new(HPos::Center, VPos::Center));
        let centre = (WIDTH as i32 / 2, TITLE_H as i32 / 2 + 4);
        title_area.draw(&Text::new(chart.title.to_string(), centre, style))?;
    }

    // The legend column: as wide as the longest name, a third of the chart at most.
    let legend_style = text_style(14.0).pos(Pos::new(HPos::Left, VPos::Center));
    let named = chart.series.iter().filter(|s| !s.name.is_empty()).count();
    let legend_w = if text && named > 0 {
        let mut widest = 0;
        for s in chart.series {
            widest = widest.max(root.estimate_text_size(&s.name, &legend_style)?.0);
        }
        (widest + 56).clamp(90, WIDTH / 3)
    } else {
        0
    };
    let (plot_area, legend_area) = body.split_horizontally(WIDTH - legend_w);

    let (xr, yr) = (x_range(chart), y_range(chart));
    let ticks = x_ticks(chart, &xr);
    let mut c = ChartBuilder::on(&plot_area)
        .margin(MARGIN)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(xr.clone(), yr.clone())?;
    let grid = RGBColor(215, 215, 215);
    {
        let mut mesh = c.configure_mesh();
        mesh.light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(grid)
            .max_light_lines(1)
            .y_labels(8);
        if ticks.is_some() {
            mesh.x_labels(0);
        }
        if text {
            mesh.label_style(text_style(13.0))
                .axis_desc_style(text_style(15.0));
            if !chart.x_label.is_empty() {
                mesh.x_desc(chart.x_label);
            }
            if !chart.y_label.is_empty() {
                mesh.y_desc(chart.y_label);
            }
        } else {
            mesh.disable_axes();
        }
        mesh.draw()?;
    }
    if let Some(ticks) = &ticks {
        let style = text_style(13.0).pos(Pos::new(HPos::Center, VPos::Top));
        for (x, label) in ticks {
            if chart.kind == ChartKind::Lines {
                c.plotting_area().draw(&PathElement::new(
                    vec![(*x, yr.start), (*x, yr.end)],
                    grid.stroke_width(1),
                ))?;
            }
            let (px, py) = c.backend_coord(&(*x, yr.start));
            root.draw(&PathElement::new(vec![(px, py), (px, py + 5)], BLACK))?;
            if text {
                root.draw(&Text::new(label.clone(), (px, py + 8), style.clone()))?;
            }
        }
    }

    let colours = colours(chart);
    let area = c.plotting_area();
    let n = chart.series.len().max(1) as f64;
    for (j, (s, &colour)) in chart.series.iter().zip(&colours).enumerate() {
        let points = || s.points.iter().copied().filter(finite);
        match (chart.kind, s.style) {
            (ChartKind::Bars, _) => {
                let w = 0.8 / n;
                for (x, y) in points() {
                    let left = x.round() - 0.4 + j as f64 * w;
                    area.draw(&Rectangle::new(
                        [(left, 0.0), (left + w, y)],
                        colour.filled(),
                    ))?;
                }
            }
            (ChartKind::Lines, SeriesStyle::Line) => {
                for segment in s.points.split(|p| !finite(p)) {
                    if segment.len() > 1 {
                        area.draw(&PathElement::new(segment.to_vec(), colour.stroke_width(2)))?;
                    }
                }
                for p in points() {
                    area.draw(&Circle::new(p, 3, colour.filled()))?;
                }
            }
            (ChartKind::Lines, SeriesStyle::Points) => {
                for p in points() {
                    area.draw(&Circle::new(p, 4, colour.filled()))?;
                }
            }
            (ChartKind::Lines, SeriesStyle::Rings) => {
                for p in points() {
                    area.draw(&Circle::new(p, 8, colour.stroke_width(2)))?;
                }
            }
        }
    }
    area.draw(&Rectangle::new(
        [(xr.start, yr.start), (xr.end, yr.end)],
        BLACK.stroke_width(1),
    ))?;

    if legend_w > 0 {
        let (_, height) = legend_area.dim_in_pixel();
        let mut y = (MARGIN as i32) + LEGEND_ROW / 2;
        for (s, &colour) in chart.series.iter().zip(&colours) {
            if s.name.is_empty() {
                continue;
            }
            if y + LEGEND_ROW / 2 > height as i32 {
                break;
            }
            match (chart.kind, s.style) {
                (ChartKind::Bars, _) => legend_area
                    .draw(&Rectangle::new([(10, y - 6), (30, y + 6)], colour.filled()))?,
                (_, SeriesStyle::Line) => {
                    legend_area.draw(&PathElement::new(
                        vec![(6, y), (34, y)],
                        colour.stroke_width(2),
                    ))?;
                    legend_area.draw(&Circle::new((20, y), 3, colour.filled()))?
                }
                (_, SeriesStyle::Points) => {
                    legend_area.draw(&Circle::new((20, y), 4, colour.filled()))?
                }
                (_, SeriesStyle::Rings) => {
                    legend_area.draw(&Circle::new((20, y), 7, colour.stroke_width(2)))?
                }
            }
            legend_area.draw(&Text::new(s.name.clone(), (42, y), legend_style.clone()))?;
            y += LEGEND_ROW;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_series() -> Vec<Series> {
        vec![
            Series::line("alpha-series", vec![(0.0, 0.5), (1.0, 0.8), (2.0, 0.2)]),
            Series::points("beta-series", vec![(0.5, -0.3), (1.5, 0.9)]),
        ]
    }

    fn chart<'a>(series: &'a [Series], kind: ChartKind) -> Chart<'a> {
        Chart {
            title: "Test chart",
            x_label: "layer",
            y_label: "value",
            kind,
            series,
            x_ticks: None,
        }
    }

    /// Decodes a PNG, returning (width, height).
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        let decoder = png::Decoder::new(bytes);
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        (info.width, info.height)
    }

    #[test]
    fn two_series_write_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let series = two_series();
        let files =
            write_chart(&dir.path().join("chart"), &chart(&series, ChartKind::Lines)).unwrap();
        assert_eq!(
            files,
            vec![dir.path().join("chart.svg"), dir.path().join("chart.png")]
        );
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("<circle"), "{svg}");
        if font_path().is_some() {
            for name in [
                "alpha-series",
                "beta-series",
                "Test chart",
                "layer",
                "value",
            ] {
                assert!(svg.contains(name), "{name} missing from {svg}");
            }
        }
        let png = std::fs::read(&files[1]).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(png_size(&png), (WIDTH, HEIGHT));
        // Only the two charts in the folder: no temporary file left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn text_shows_in_the_png_when_a_font_is_present() {
        // The same chart with and without text differs in the PNG pixels iff a font loaded.
        let series = two_series();
        let c = chart(&series, ChartKind::Lines);
        let with = render_png(&c, font_path().is_some()).unwrap();
        let without = render_png(&c, false).unwrap();
        assert_eq!(with != without, font_path().is_some());
    }

    #[test]
    fn charts_without_text_draw_everything_else() {
        let series = two_series();
        let mut c = chart(&series, ChartKind::Lines);
        let ticks = [(0.0, "zero".to_string()), (2.0, "two".to_string())];
        c.x_ticks = Some(&ticks);
        let svg = render_svg(&c, false).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<circle") && svg.contains("<polyline"));
        assert!(!svg.contains("<text"), "{svg}");
        let png = render_png(&c, false).unwrap();
        assert_eq!(png_size(&png), (WIDTH, HEIGHT));
    }

    #[test]
    fn empty_nan_and_single_point_series_do_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![Series::line("empty", vec![])],
            vec![Series::line("nan", vec![(f64::NAN, 1.0), (1.0, f64::NAN)])],
            vec![Series::line("one", vec![(3.0, 3.0)])],
            vec![Series::line(
                "gaps",
                vec![
                    (0.0, 1.0),
                    (1.0, f64::NAN),
                    (2.0, f64::INFINITY),
                    (3.0, 2.0),
                ],
            )],
            vec![Series::rings("", vec![(0.0, 0.0), (0.0, 0.0)])],
        ];
        for (i, series) in cases.iter().enumerate() {
            for kind in [ChartKind::Lines, ChartKind::Bars] {
                let stem = dir.path().join(format!("c{i}-{kind:?}"));
                let files = write_chart(&stem, &chart(series, kind)).unwrap();
                let svg = std::fs::read_to_string(&files[0]).unwrap();
                assert!(svg.starts_with("<svg"));
                assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
                assert_eq!(
                    png_size(&std::fs::read(&files[1]).unwrap()),
                    (WIDTH, HEIGHT)
                );
            }
        }
    }

    #[test]
    fn bars_group_series_at_integer_x() {
        let series = [
            Series::line("kept", vec![(0.0, 3.0), (1.0, 5.0), (2.0, 0.0)]),
            Series::line("patched", vec![(0.0, 1.0), (1.2, 2.0)]),
        ];
        let c = chart(&series, ChartKind::Bars);
        assert_eq!(x_range(&c), -0.6..2.6);
        let yr = y_range(&c);
        assert_eq!(yr.start, 0.0);
        assert!(yr.end > 5.0);
        let ticks = x_ticks(&c, &x_range(&c)).unwrap();
        let labels: Vec<&str> = ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0", "1", "2"]);
        let svg = render_svg(&c, font_path().is_some()).unwrap();
        // 5 bars, the background, the frame, the legend swatches when there is text.
        assert!(svg.matches("<rect").count() >= 7, "{svg}");
    }

    #[test]
    fn ranges_cover_the_data_and_the_ticks() {
        let series = [Series::line(
            "s",
            vec![(1.0, -2.0), (5.0, 4.0), (f64::NAN, 100.0)],
        )];
        let ticks = [(0.0, "start".to_string())];
        let mut c = chart(&series, ChartKind::Lines);
        c.x_ticks = Some(&ticks);
        let (xr, yr) = (x_range(&c), y_range(&c));
        assert!(xr.start < 0.0 && xr.end > 5.0, "{xr:?}");
        assert!(yr.start < -2.0 && yr.end > 4.0 && yr.end < 5.0, "{yr:?}");
        let many: Vec<(f64, String)> = (0..100).map(|i| (i as f64, i.to_string())).collect();
        c.x_ticks = Some(&many);
        let thinned = x_ticks(&c, &(0.0..100.0)).unwrap();
        assert!(thinned.len() <= MAX_X_TICKS && thinned.len() > MAX_X_TICKS / 2);
    }

    #[test]
    fn suffixes_are_appended() {
        assert_eq!(
            with_suffix(Path::new("out/run.v2"), "svg"),
            PathBuf::from("out/run.v2.svg")
        );
    }
}
