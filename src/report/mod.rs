//! Charts for the commands that draw: one call, [`plot::write_chart`], writes the same chart as
//! SVG and PNG, with a title, axis labels and a legend.
//!
//! Text needs a TrueType font, read at run time (none is shipped): `$REALIGN_FONT` if set, else
//! DejaVu Sans or another sans-serif TTF from the usual system folders (see [`plot::font_path`]).
//! Without one the charts are drawn all the same, with no text at all; fonts never make a
//! command fail.
//!
//! | item | what |
//! |---|---|
//! | [`Chart`], [`Series`], [`ChartKind`], [`SeriesStyle`] | what to draw: line charts (with point and ring markers) or grouped bars |
//! | [`write_chart`] | draws a chart into `stem.svg` and `stem.png`, atomically |
//! | [`font_path`] | the font that text is drawn with, if any |
//! | [`ReportError`] | a chart that cannot be drawn or encoded |

use std::path::PathBuf;

pub mod plot;

pub use plot::{font_path, write_chart, Chart, ChartKind, Series, SeriesStyle};

/// Errors of the report module.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Drawing or encoding a chart failed.
    #[error("{file}: cannot draw the chart: {reason}")]
    Plot {
        /// The chart file.
        file: PathBuf,
        /// What the drawing backend or the PNG encoder said.
        reason: String,
    },
}
