//! An SVG chart of the ratios: one horizontal bar per comparison, with the
//! 1.0x line (parity) and the goal, where there is one, marked.

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `rows`: (label, ratio, goal).
pub fn ratios_svg(title: &str, rows: &[(String, f64, Option<f64>)]) -> String {
    // About 6.6 px per character at 12 px sans-serif.
    let longest = rows
        .iter()
        .map(|(l, _, _)| l.chars().count())
        .max()
        .unwrap_or(20);
    let label_w = longest as f64 * 6.6 + 20.0;
    let bar_w = 420.0;
    let row_h = 22.0;
    let top = 50.0;
    let max = rows
        .iter()
        .map(|(_, r, g)| r.max(g.unwrap_or(0.0)))
        .fold(2.0f64, f64::max)
        .min(25.0);
    let x = |v: f64| label_w + bar_w * (v.min(max) / max);
    let height = top + row_h * rows.len() as f64 + 40.0;
    let width = label_w + bar_w + 90.0;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='10' y='22' font-size='15' font-weight='bold'>{}</text>\n\
         <text x='10' y='40' fill='#555'>bars: vmcrypt's figure / the peer's, same run; grey line: 1.0x; red tick: goal</text>\n",
        esc(title)
    );
    for (i, (label, r, goal)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let colour = match goal {
            Some(g) if r < g => "#d9822b",
            _ => "#2b7bd9",
        };
        s.push_str(&format!(
            "<text x='{}' y='{}' text-anchor='end'>{}</text>\n<rect x='{label_w}' y='{}' width='{:.1}' height='{}' fill='{colour}'/>\n<text x='{:.1}' y='{}'>{r:.2}x</text>\n",
            label_w - 8.0,
            y + 15.0,
            esc(label),
            y + 3.0,
            x(*r) - label_w,
            row_h - 6.0,
            x(*r) + 4.0,
            y + 15.0
        ));
        if let Some(g) = goal {
            s.push_str(&format!(
                "<line x1='{0:.1}' x2='{0:.1}' y1='{1}' y2='{2}' stroke='#c00' stroke-width='2'/>\n",
                x(*g),
                y + 1.0,
                y + row_h - 1.0
            ));
        }
    }
    let one = x(1.0);
    s.push_str(&format!(
        "<line x1='{one:.1}' x2='{one:.1}' y1='{}' y2='{}' stroke='#888' stroke-dasharray='4 3'/>\n</svg>\n",
        top - 4.0,
        top + row_h * rows.len() as f64
    ));
    s
}
