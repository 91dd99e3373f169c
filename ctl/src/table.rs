//! A plain aligned table for terminal output.
//!
//! Columns are padded to their widest line and separated by three spaces,
//! like Cilium's and kubectl's listings. A cell may hold several lines (a
//! service's backends, an identity's labels); the row then takes as many
//! lines as its tallest cell, and the other cells are blank below their
//! first line. Trailing spaces are trimmed so output diffs cleanly.

const GAP: &str = "   ";

#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut cells: Vec<String> = cells.into_iter().map(Into::into).collect();
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per output line, ending in a newline.
    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (col, cell) in row.iter().enumerate() {
                for line in cell.lines() {
                    widths[col] = widths[col].max(width(line));
                }
            }
        }

        let mut out = String::new();
        let mut emit = |cells: &[&str]| {
            let mut line = String::new();
            for (col, cell) in cells.iter().enumerate() {
                if col > 0 {
                    line.push_str(GAP);
                }
                line.push_str(cell);
                if col + 1 < columns {
                    line.extend(std::iter::repeat_n(
                        ' ',
                        widths[col].saturating_sub(width(cell)),
                    ));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        };

        let headers: Vec<&str> = self.headers.iter().map(String::as_str).collect();
        emit(&headers);
        for row in &self.rows {
            let lines: Vec<Vec<&str>> = row.iter().map(|cell| cell.lines().collect()).collect();
            let height = lines.iter().map(Vec::len).max().unwrap_or(0).max(1);
            for i in 0..height {
                let cells: Vec<&str> = lines
                    .iter()
                    .map(|l| l.get(i).copied().unwrap_or(""))
                    .collect();
                emit(&cells);
            }
        }
        out
    }
}

/// Display width, counting characters (weft's output is ASCII).
fn width(s: &str) -> usize {
    s.chars().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_to_the_widest_cell() {
        let mut t = Table::new(["ID", "Name", "Value"]);
        t.row(["1", "short", "x"]);
        t.row(["100", "a-much-longer-name", "y"]);
        assert_eq!(
            t.render(),
            "ID    Name                 Value\n\
             1     short                x\n\
             100   a-much-longer-name   y\n"
        );
    }

    #[test]
    fn multi_line_cells_take_extra_lines() {
        let mut t = Table::new(["ID", "Backend", "Service"]);
        t.row(["1", "1 => a\n2 => bb", "default/web"]);
        t.row(["2", "", "default/empty"]);
        assert_eq!(
            t.render(),
            "ID   Backend   Service\n\
             1    1 => a    default/web\n\
             \x20    2 => bb\n\
             2              default/empty\n"
        );
    }

    #[test]
    fn header_only_when_empty_and_trailing_spaces_trimmed() {
        let t = Table::new(["A", "Bee"]);
        assert!(t.is_empty());
        assert_eq!(t.render(), "A   Bee\n");
        let mut t = Table::new(["Long header", "B"]);
        t.row(["x", ""]);
        assert_eq!(t.render(), "Long header   B\nx\n");
    }

    #[test]
    fn short_and_long_rows_are_normalised() {
        let mut t = Table::new(["A", "B"]);
        t.row(["1"]);
        t.row(["1", "2", "3"]);
        assert_eq!(t.render(), "A   B\n1\n1   2\n");
    }
}
