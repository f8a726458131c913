//! A dependency-free SVG writer for grouped bar charts, for benchmark reports.
//!
//! [`chart`] renders one SVG document of [`Panel`]s (two per row when there are several), each a
//! grouped bar chart: one group per x-axis label, one bar per [`Series`] in each group, a
//! legend, a y axis with a few round ticks and the value printed on every bar. Values that are
//! NaN, infinite or missing draw no bar and are labelled "n/a"; zero draws no bar.

use std::fmt::Write as _;

/// One data series: a name for the legend and one value per group of its [`Panel`]. Missing
/// trailing values count as "n/a".
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// One value per group, in the order of [`Panel::groups`].
    pub values: Vec<f64>,
}

/// One grouped bar chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    /// Panel heading.
    pub title: String,
    /// Unit of the values, shown on the y axis and after each bar's value (may be empty).
    pub unit: String,
    /// X-axis labels, one per group of bars.
    pub groups: Vec<String>,
    /// The series; each contributes one bar to every group.
    pub series: Vec<Series>,
}

/// Bar colours, assigned to series in order (Tableau 10).
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

const DOC_MARGIN: f64 = 12.0;
const DOC_TITLE_HEIGHT: f64 = 34.0;
const PANEL_GAP: f64 = 16.0;
const PANEL_MIN_WIDTH: f64 = 480.0;
const PLOT_LEFT: f64 = 64.0;
const PLOT_RIGHT: f64 = 16.0;
const PLOT_HEIGHT: f64 = 220.0;
const LEGEND_TOP: f64 = 40.0;
const LEGEND_ROW: f64 = 16.0;
const VALUE_FONT: f64 = 10.0;
const GROUP_FONT: f64 = 11.0;
const MAX_BAR_WIDTH: f64 = 44.0;
/// Two panels per row when each is at most this wide.
const TWO_COLUMN_MAX_WIDTH: f64 = 640.0;

/// Appends formatted text to a `String` (writing to a `String` cannot fail).
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

/// Renders `panels` as one SVG document titled `title`: panels two per row when there are
/// several (one per row when they are wide), each a grouped bar chart with legend, y ticks and
/// value labels.
pub fn chart(title: &str, panels: &[Panel]) -> String {
    let width = panels
        .iter()
        .map(panel_min_width)
        .fold(PANEL_MIN_WIDTH, f64::max);
    let columns = if panels.len() >= 2 && width <= TWO_COLUMN_MAX_WIDTH {
        2
    } else {
        1
    };
    let rendered: Vec<(String, f64)> = panels.iter().map(|p| render_panel(p, width)).collect();

    let mut body = String::new();
    let mut y = DOC_MARGIN + DOC_TITLE_HEIGHT;
    for row in rendered.chunks(columns) {
        let row_height = row.iter().map(|(_, h)| *h).fold(0.0, f64::max);
        for (col, (svg, _)) in row.iter().enumerate() {
            let x = DOC_MARGIN + col as f64 * (width + PANEL_GAP);
            w!(
                body,
                "<g transform=\"translate({},{})\">\n{}</g>\n",
                num(x),
                num(y),
                svg
            );
        }
        y += row_height + PANEL_GAP;
    }

    let doc_width = 2.0 * DOC_MARGIN + columns as f64 * width + (columns as f64 - 1.0) * PANEL_GAP;
    let doc_height = y - PANEL_GAP + DOC_MARGIN;
    let mut out = String::new();
    w!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"Helvetica, Arial, sans-serif\">\n",
        w = num(doc_width),
        h = num(doc_height)
    );
    w!(
        out,
        "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    );
    w!(
        out,
        "<text x=\"{}\" y=\"{}\" font-size=\"18\" font-weight=\"bold\" fill=\"#222\">{}</text>\n",
        num(DOC_MARGIN),
        num(DOC_MARGIN + 20.0),
        escape(title)
    );
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

/// Width a panel needs so bars stay readable.
fn panel_min_width(panel: &Panel) -> f64 {
    let per_group = panel.series.len().max(1) as f64 * 20.0 + 16.0;
    PLOT_LEFT + PLOT_RIGHT + panel.groups.len() as f64 * per_group
}

/// Rough rendered width of `text` in a sans-serif font of `size` px.
fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.6
}

/// The value of series `s` for group `g`, when it is a finite number.
fn value(series: &Series, group: usize) -> Option<f64> {
    series.values.get(group).copied().filter(|v| v.is_finite())
}

/// The text printed on a bar: the value to 3 significant digits and the unit, or "n/a".
fn value_label(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "n/a".to_string(),
        Some(v) if unit.is_empty() => format_value(v),
        Some(v) => format!("{} {}", format_value(v), unit),
    }
}

/// Renders one panel at the origin, `width` wide; returns the SVG fragment and its height.
fn render_panel(panel: &Panel, width: f64) -> (String, f64) {
    let n_groups = panel.groups.len();
    let n_series = panel.series.len();
    let plot_width = width - PLOT_LEFT - PLOT_RIGHT;

    // Y scale: always include zero, so bars start at a common baseline.
    let values = || {
        panel
            .series
            .iter()
            .flat_map(|s| (0..n_groups).filter_map(move |g| value(s, g)))
    };
    let lo = values().fold(0.0, f64::min);
    let mut hi = values().fold(0.0, f64::max);
    if lo == hi {
        hi = lo + 1.0;
    }
    let ticks = nice_ticks(lo, hi);
    let (axis_lo, axis_hi) = match (ticks.first(), ticks.last()) {
        (Some(a), Some(b)) if b > a => (*a, *b),
        _ => (lo, hi),
    };

    // Bar geometry.
    let group_width = plot_width / n_groups.max(1) as f64;
    let bar_width = (group_width * 0.8 / n_series.max(1) as f64).min(MAX_BAR_WIDTH);
    let labels: Vec<Vec<String>> = panel
        .series
        .iter()
        .map(|s| {
            (0..n_groups)
                .map(|g| value_label(value(s, g), &panel.unit))
                .collect()
        })
        .collect();
    let widest_label = labels
        .iter()
        .flatten()
        .map(|l| text_width(l, VALUE_FONT))
        .fold(0.0, f64::max);
    let rotate_values = widest_label > bar_width + 4.0;
    // Room the value labels need above the top tick and below the bottom one: a label sits
    // just beyond its bar's end, so only labels of bars near the axis ends stick out.
    let (mut room_above, mut room_below) = (0.0f64, 0.0f64);
    for (series, series_labels) in panel.series.iter().zip(&labels) {
        for (g, label) in series_labels.iter().enumerate() {
            let extent = if rotate_values {
                text_width(label, VALUE_FONT) + 4.0
            } else {
                VALUE_FONT + 3.0
            };
            let v = value(series, g).unwrap_or(0.0);
            let end_from_top = (axis_hi - v) / (axis_hi - axis_lo) * PLOT_HEIGHT;
            if v < 0.0 {
                room_below = room_below.max(extent - (PLOT_HEIGHT - end_from_top));
            } else {
                room_above = room_above.max(extent - end_from_top);
            }
        }
    }

    // Legend, wrapped to the panel width.
    let mut legend = String::new();
    let (mut lx, mut ly) = (PLOT_LEFT, LEGEND_TOP);
    for (i, s) in panel.series.iter().enumerate() {
        let item_width = 16.0 + text_width(&s.name, 11.0) + 14.0;
        if lx + item_width > width - PLOT_RIGHT && lx > PLOT_LEFT {
            lx = PLOT_LEFT;
            ly += LEGEND_ROW;
        }
        w!(
            legend,
            "<rect x=\"{}\" y=\"{}\" width=\"11\" height=\"11\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#333\">{}</text>\n",
            num(lx),
            num(ly - 9.0),
            PALETTE[i % PALETTE.len()],
            num(lx + 15.0),
            num(ly),
            escape(&s.name)
        );
        lx += item_width;
    }
    let legend_bottom = if n_series == 0 {
        LEGEND_TOP - LEGEND_ROW
    } else {
        ly
    };

    let plot_top = legend_bottom + 12.0 + room_above;
    let plot_bottom = plot_top + PLOT_HEIGHT;
    let y_of = |v: f64| plot_top + (axis_hi - v) / (axis_hi - axis_lo) * PLOT_HEIGHT;
    let baseline = y_of(0.0);

    // Group labels below the plot, slanted when they do not fit their group.
    let widest_group = panel
        .groups
        .iter()
        .map(|g| text_width(g, GROUP_FONT))
        .fold(0.0, f64::max);
    let slant_groups = widest_group > group_width - 4.0;
    let groups_top = plot_bottom + room_below + 6.0;
    let height = groups_top
        + if slant_groups {
            widest_group * 0.5 + 18.0
        } else {
            18.0
        };

    let mut out = String::new();
    w!(
        out,
        "<rect x=\"0.5\" y=\"0.5\" width=\"{}\" height=\"{}\" fill=\"#fcfcfc\" stroke=\"#e2e2e2\"/>\n",
        num(width - 1.0),
        num(height - 1.0)
    );
    w!(
        out,
        "<text x=\"{}\" y=\"20\" font-size=\"14\" font-weight=\"bold\" fill=\"#222\">{}</text>\n",
        num(PLOT_LEFT),
        escape(&panel.title)
    );
    out.push_str("<g class=\"legend\">\n");
    out.push_str(&legend);
    out.push_str("</g>\n");

    // Grid and y axis.
    out.push_str("<g class=\"y-axis\" font-size=\"10\" fill=\"#555\" text-anchor=\"end\">\n");
    for t in &ticks {
        let y = y_of(*t);
        w!(
            out,
            "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#e6e6e6\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>\n",
            num(PLOT_LEFT),
            num(PLOT_LEFT + plot_width),
            num(PLOT_LEFT - 6.0),
            num(y + 3.5),
            escape(&format_value(*t)),
            y = num(y)
        );
    }
    w!(
        out,
        "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#888\"/>\n",
        num(y_of(axis_hi)),
        num(y_of(axis_lo)),
        x = num(PLOT_LEFT)
    );
    if !panel.unit.is_empty() {
        let cy = (y_of(axis_hi) + y_of(axis_lo)) / 2.0;
        w!(
            out,
            "<text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n",
            num(cy),
            escape(&panel.unit)
        );
    }
    out.push_str("</g>\n");

    // Bars, one <g> per series.
    let bars_left = |g: usize| {
        PLOT_LEFT + g as f64 * group_width + (group_width - bar_width * n_series as f64) / 2.0
    };
    let mut value_text = String::new();
    for (i, (s, series_labels)) in panel.series.iter().zip(&labels).enumerate() {
        w!(
            out,
            "<g class=\"series\" fill=\"{}\">\n",
            PALETTE[i % PALETTE.len()]
        );
        for (g, label) in series_labels.iter().enumerate() {
            let x = bars_left(g) + i as f64 * bar_width;
            let cx = x + bar_width / 2.0;
            let v = value(s, g);
            if let Some(v) = v.filter(|v| *v != 0.0) {
                let (top, bottom) = if v > 0.0 {
                    (y_of(v), baseline)
                } else {
                    (baseline, y_of(v))
                };
                w!(
                    out,
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"><title>{}, {}: {}</title></rect>\n",
                    num(x + 1.0),
                    num(top),
                    num((bar_width - 2.0).max(1.0)),
                    num(bottom - top),
                    escape(&s.name),
                    escape(&panel.groups[g]),
                    escape(label)
                );
            }
            // Label just beyond the bar's end (above for positive and zero, below for negative).
            let end = v.map_or(baseline, y_of);
            let negative = v.is_some_and(|v| v < 0.0);
            let colour = if v.is_some() { "#222" } else { "#999" };
            if rotate_values {
                let (y, anchor) = if negative {
                    (end + 4.0, "end")
                } else {
                    (end - 4.0, "start")
                };
                w!(
                    value_text,
                    "<text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"{}\" fill=\"{}\">{}</text>\n",
                    num(cx + VALUE_FONT * 0.35),
                    num(y),
                    anchor,
                    colour,
                    escape(label)
                );
            } else {
                let y = if negative {
                    end + VALUE_FONT + 2.0
                } else {
                    end - 3.0
                };
                w!(
                    value_text,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{}\">{}</text>\n",
                    num(cx),
                    num(y),
                    colour,
                    escape(label)
                );
            }
        }
        out.push_str("</g>\n");
    }
    w!(
        out,
        "<g class=\"values\" font-size=\"{}\">\n",
        num(VALUE_FONT)
    );
    out.push_str(&value_text);
    out.push_str("</g>\n");

    // Zero line and group labels.
    w!(
        out,
        "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#444\"/>\n",
        num(PLOT_LEFT),
        num(PLOT_LEFT + plot_width),
        y = num(baseline)
    );
    w!(
        out,
        "<g class=\"x-axis\" font-size=\"{}\" fill=\"#333\">\n",
        num(GROUP_FONT)
    );
    for (g, name) in panel.groups.iter().enumerate() {
        let cx = PLOT_LEFT + (g as f64 + 0.5) * group_width;
        if slant_groups {
            w!(
                out,
                "<text transform=\"translate({},{}) rotate(-30)\" text-anchor=\"end\">{}</text>\n",
                num(cx + 4.0),
                num(groups_top + GROUP_FONT),
                escape(name)
            );
        } else {
            w!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                num(cx),
                num(groups_top + GROUP_FONT),
                escape(name)
            );
        }
    }
    out.push_str("</g>\n");
    if n_groups == 0 || n_series == 0 {
        w!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\" fill=\"#999\">no data</text>\n",
            num(PLOT_LEFT + plot_width / 2.0),
            num(plot_top + PLOT_HEIGHT / 2.0)
        );
    }
    (out, height)
}

/// Round tick values covering `[lo, hi]` (`lo < hi`, both finite): 4 to 6 ticks at a step of
/// 1, 2, 2.5 or 5 times a power of ten, choosing the step that wastes the least range.
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return vec![lo, hi];
    }
    let magnitude = span.log10().floor() as i32;
    let mut best: Option<(f64, i64, i64)> = None; // (step, first index, last index)
    for exp in magnitude - 2..=magnitude + 1 {
        for mantissa in [1.0, 2.0, 2.5, 5.0] {
            let step = mantissa * 10f64.powi(exp);
            let first = (lo / step + 1e-9).floor() as i64;
            let last = (hi / step - 1e-9).ceil() as i64;
            let intervals = last - first;
            if !(3..=5).contains(&intervals) {
                continue;
            }
            let covered = intervals as f64 * step;
            if best.is_none_or(|(s, f, l)| covered < (l - f) as f64 * s - 1e-12 * span) {
                best = Some((step, first, last));
            }
        }
    }
    match best {
        Some((step, first, last)) => (first..=last).map(|i| i as f64 * step).collect(),
        None => (0..=4).map(|i| lo + span * i as f64 / 4.0).collect(),
    }
}

/// A value to at most 3 significant digits: "412", "41.2", "0.0412", "1234" (integers below
/// 10,000 keep all their digits), "12.3k", "4.57M", "1.2G"; "n/a" for NaN and infinities.
fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_string();
    }
    if v == 0.0 {
        return "0".to_string();
    }
    let rounded = round_significant(v, 3);
    let a = rounded.abs();
    if a >= 1e4 {
        for (scale, suffix) in [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
            if a >= scale || suffix == "k" {
                return format!("{}{}", plain(rounded / scale), suffix);
            }
        }
    }
    if v.abs() >= 1e3 {
        return format!("{:.0}", v);
    }
    if a < 1e-9 {
        return format!("{:.2e}", v);
    }
    plain(rounded)
}

/// `v` (already rounded to 3 significant digits, |v| < 1000 or so) without trailing zeros.
fn plain(v: f64) -> String {
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let s = format!("{:.*}", decimals, v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `v` rounded to `digits` significant digits.
fn round_significant(v: f64, digits: i32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    let r = (v * scale).round() / scale;
    if r.is_finite() {
        r
    } else {
        v
    }
}

/// A coordinate with at most two decimals and no trailing zeros.
fn num(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{:.2}", v);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// `text` with the XML special characters escaped, for element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab and newlines are not allowed in XML 1.0.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, values: &[f64]) -> Series {
        Series {
            name: name.to_string(),
            values: values.to_vec(),
        }
    }

    fn example() -> Vec<Panel> {
        vec![
            Panel {
                title: "Stored after dedup".to_string(),
                unit: "MiB".to_string(),
                groups: vec!["1 VM".into(), "4 VMs".into(), "16 VMs".into()],
                series: vec![
                    series("raw", &[256.0, 1024.0, 4096.0]),
                    series("vmcsnap", &[100.0, 180.0, 412.3]),
                    series("qemu file", &[255.0, 1020.0, f64::NAN]),
                ],
            },
            Panel {
                title: "Capture time".to_string(),
                unit: "s".to_string(),
                groups: vec!["1 VM".into(), "4 VMs".into(), "16 VMs".into()],
                series: vec![
                    series("vmcsnap", &[0.41, 1.234, 3.5]),
                    series("qemu file", &[0.9, 0.0, 12.0]),
                ],
            },
            Panel {
                title: "Throughput <per host> & more".to_string(),
                unit: "MiB/s".to_string(),
                groups: vec![
                    "host-a".into(),
                    "host-b".into(),
                    "a much longer host name".into(),
                    "d".into(),
                ],
                series: vec![
                    series("upload", &[812.0, 790.5, 12_345.0, -40.0]),
                    series("restore", &[1500.0, 1499.0]),
                ],
            },
            Panel {
                title: "Empty".to_string(),
                unit: String::new(),
                groups: vec![],
                series: vec![],
            },
        ]
    }

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    #[test]
    fn chart_is_an_svg_with_every_name() {
        let panels = example();
        let svg = chart("vmcsnap benchmark", &panels);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        for p in &panels {
            assert!(svg.contains(&escape(&p.title)), "{}", p.title);
            for g in &p.groups {
                assert!(svg.contains(&escape(g)), "{g}");
            }
            for s in &p.series {
                assert!(svg.contains(&escape(&s.name)), "{}", s.name);
            }
        }
        assert!(svg.contains("412 MiB"), "value labels carry the unit");
        assert!(
            svg.contains(">n/a<"),
            "NaN and missing values are labelled n/a"
        );
        assert!(
            !svg.contains("NaN") && !svg.contains("inf"),
            "no non-finite coordinates"
        );
        assert!(svg.contains("no data"));
    }

    #[test]
    fn chart_is_well_formed() {
        let svg = chart("a & b", &example());
        assert_eq!(count(&svg, "<g ") + count(&svg, "<g>"), count(&svg, "</g>"));
        assert_eq!(count(&svg, "<svg"), count(&svg, "</svg>"));
        assert_eq!(count(&svg, "<text"), count(&svg, "</text>"));
        assert_eq!(count(&svg, "<title>"), count(&svg, "</title>"));
        // Every tag opens and closes; no raw '&' outside entities.
        assert_eq!(count(&svg, "<"), count(&svg, ">"));
        for (i, _) in svg.match_indices('&') {
            let rest = &svg[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| rest.starts_with(e)),
                "raw & at {i}"
            );
        }
        assert!(!svg.contains("<per host>"));
        assert!(svg.contains("&lt;per host&gt; &amp; more"));
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let nan_only = Panel {
            title: "nan".into(),
            unit: "x".into(),
            groups: vec!["g".into()],
            series: vec![
                series("s", &[f64::NAN]),
                series("t", &[f64::INFINITY]),
                series("z", &[0.0]),
            ],
        };
        let svg = chart("", &[nan_only]);
        assert!(svg.starts_with("<svg"));
        assert_eq!(
            count(&svg, "<title>"),
            0,
            "no bars for NaN, infinite or zero values"
        );
        assert_eq!(count(&svg, ">n/a<"), 2);
        let svg = chart("nothing", &[]);
        assert!(svg.starts_with("<svg") && svg.contains("nothing"));
    }

    #[test]
    fn values_print_with_three_significant_digits() {
        let cases = [
            (412.3, "412"),
            (41.23, "41.2"),
            (4.1, "4.1"),
            (2.0, "2"),
            (0.04123, "0.0412"),
            (1234.0, "1234"),
            (9999.6, "10k"),
            (12_345.0, "12.3k"),
            (999_600.0, "1M"),
            (4_567_000.0, "4.57M"),
            (1.2e9, "1.2G"),
            (-3.456, "-3.46"),
            (0.0, "0"),
            (f64::NAN, "n/a"),
        ];
        for (v, want) in cases {
            assert_eq!(format_value(v), want, "{v}");
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        for (lo, hi) in [
            (0.0, 1.0),
            (0.0, 412.3),
            (0.0, 4096.0),
            (-40.0, 12_345.0),
            (0.0, 0.037),
            (0.0, 7.0),
        ] {
            let t = nice_ticks(lo, hi);
            assert!((4..=6).contains(&t.len()), "{lo}..{hi}: {t:?}");
            assert!(
                t[0] <= lo && *t.last().unwrap_or(&f64::NAN) >= hi,
                "{lo}..{hi}: {t:?}"
            );
            for x in &t {
                assert!(format_value(*x).len() <= 6, "{x} in {t:?}");
            }
        }
    }

    #[test]
    fn escape_handles_xml_specials() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
    }

    /// Writes an example chart for eyeballing.
    #[test]
    fn write_example_svg() {
        let path = std::env::temp_dir().join("example.svg");
        std::fs::write(
            &path,
            chart("vmcsnap benchmark: 3 hosts, 16 VMs", &example()),
        )
        .expect("write example.svg");
    }
}
