// A command's output shown as a terminal shows it, built as DOM nodes from text.
//
// Commands print for a terminal: colours (`ls --color`, `pytest --color=yes`,
// `grep --color=always`), progress meters that go back to the start of their
// line with "\r" (curl, apt), spinners that back up with "\b".  Put on the
// page as they are, those bytes show as boxes and "[31m" between the words.
// Here the colours and bold/italic/underline of SGR sequences become styled
// spans (set through the CSSOM, which the page's CSP allows, never as HTML),
// a "\r" followed by more text starts its line again (so a progress meter
// shows its last state; "\r\n" is one line end), "\b" takes back the line's
// last character, "ESC [ K" after a "\r" (or "ESC [ 2 K") clears the line,
// and every other control character or sequence (cursor moves, window
// titles, hyperlink markers) is dropped.  The text itself is never changed:
// the model reads the output as the command printed it.  (agent_core's
// terminal_text follows the same rules in plain text, for the Markdown export.)
//
// A running command's output comes in pieces that may cut a sequence in
// two: the writer keeps an unfinished one (up to 4 KiB; a terminal would
// swallow a longer one too) until the next piece.  Plain text, the usual
// case, is appended as it is, in one text node.

const TOKEN = new RegExp([
  "\\x1b\\[([0-?]*)[ -/]*([@-~]|$)",                 // CSI: colours, erase line, cursor moves
  "\\x1b\\][^\\x07\\x1b]*(\\x07|\\x1b\\\\|\\x1b?$)",  // OSC, ended by BEL or ESC \: titles, links
  "\\x1b[ -/]*([0-~]|$)",                             // any other escape
  "\\r\\n|\\r|\\n|[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f]",  // line ends, backspace, other controls
].join("|"), "g");
const SPECIAL = /[\x00-\x08\x0b-\x1f\x7f-\x9f]/;       // what plain text has none of
const HELD_AT_MOST = 4096;

export class TermWriter {
  constructor(pre) {
    this.pre = pre;
    this.held = "";          // an escape sequence cut at the end of the last piece
    this.style = {};         // the SGR state: fg, bg, bold, dim, italic, underline, inverse
    this.line = [];          // the nodes since the last line end: what "\r" replaces
    this.cr = false;         // a "\r" was seen: the next text starts the line again
  }

  write(text) {
    text = this.held + text;
    this.held = "";
    if (!SPECIAL.test(text) && !this.cr && !Object.keys(this.style).length) {
      const end = text.lastIndexOf("\n");
      if (end >= 0) {
        this.pre.append(text.slice(0, end + 1));
        this.line = [];
      }
      this.put(text.slice(end + 1));
      return;
    }
    let at = 0;
    for (const m of text.matchAll(TOKEN)) {
      this.put(text.slice(at, m.index));
      at = m.index + m[0].length;
      const [seq, params, final, osc, other] = m;
      if (final === "" || other === "" || osc === "" || osc === "\x1b") {
        // Cut at the end of this piece: wait for the rest.
        if (seq.length < HELD_AT_MOST) this.held = seq;
      } else if (seq === "\n" || seq === "\r\n") {
        this.pre.append("\n");
        this.line = [];
        this.cr = false;
      } else if (seq === "\r") {
        this.cr = true;
      } else if (seq === "\b") {
        this.backspace();
      } else if (final === "m") {
        this.sgr(params);
      } else if (final === "K" && (params === "2" || this.cr)) {
        this.clearLine();
      }
    }
    this.put(text.slice(at));
  }

  put(text) {
    if (!text) return;
    if (this.cr) {
      this.clearLine();
      this.cr = false;
    }
    const node = this.styled(text);
    this.pre.append(node);
    this.line.push(node);
  }

  clearLine() {
    for (const node of this.line) node.remove();
    this.line = [];
  }

  backspace() {
    const node = this.line.at(-1);
    if (!node) return;
    const text = node.textContent.slice(0, -1);
    if (text) node.textContent = text;
    else {
      node.remove();
      this.line.pop();
    }
  }

  styled(text) {
    const s = this.style;
    if (!Object.keys(s).length) return document.createTextNode(text);
    const span = document.createElement("span");
    span.textContent = text;
    let fg = s.fg, bg = s.bg;
    if (s.inverse) [fg, bg] = [bg ?? "var(--code)", fg ?? "var(--fg)"];
    if (fg) span.style.color = fg;
    if (bg) span.style.backgroundColor = bg;
    if (s.bold) span.style.fontWeight = "bold";
    if (s.dim) span.style.opacity = "0.7";
    if (s.italic) span.style.fontStyle = "italic";
    if (s.underline) span.style.textDecoration = "underline";
    return span;
  }

  sgr(params) {
    // "ESC [ m" is a reset; a part that is not a number (a ':' form) is skipped.
    const codes = params.split(";").map((p) => (/^\d*$/.test(p) ? Number(p) : -1));
    const s = this.style;
    for (let i = 0; i < codes.length; i++) {
      const n = codes[i];
      if (n === 0) for (const key of Object.keys(s)) delete s[key];
      else if (n === 1) s.bold = true;
      else if (n === 2) s.dim = true;
      else if (n === 3) s.italic = true;
      else if (n === 4) s.underline = true;
      else if (n === 7) s.inverse = true;
      else if (n === 22) { delete s.bold; delete s.dim; }
      else if (n === 23) delete s.italic;
      else if (n === 24) delete s.underline;
      else if (n === 27) delete s.inverse;
      else if (n >= 30 && n <= 37) s.fg = colour(n - 30);
      else if (n >= 90 && n <= 97) s.fg = colour(n - 90 + 8);
      else if (n === 39) delete s.fg;
      else if (n >= 40 && n <= 47) s.bg = colour(n - 40);
      else if (n >= 100 && n <= 107) s.bg = colour(n - 100 + 8);
      else if (n === 49) delete s.bg;
      else if (n === 38 || n === 48) {
        // 38;5;N (the 256 colours) or 38;2;R;G;B (any colour).
        const [value, used] = codes[i + 1] === 5 ? [colour(codes[i + 2]), 2]
          : codes[i + 1] === 2 ? [rgb(codes[i + 2], codes[i + 3], codes[i + 4]), 4] : [null, 0];
        if (value) s[n === 38 ? "fg" : "bg"] = value;
        i += used;
      }
    }
  }
}

// The 16 colours follow the page's theme (style.css, --ansi-0 … --ansi-15);
// the 6×6×6 cube and the grey ramp of the 256 are xterm's.
function colour(n) {
  if (!Number.isInteger(n) || n < 0 || n > 255) return null;
  if (n < 16) return `var(--ansi-${n})`;
  if (n >= 232) return rgb(8 + (n - 232) * 10, 8 + (n - 232) * 10, 8 + (n - 232) * 10);
  const level = (v) => (v ? 55 + v * 40 : 0);
  n -= 16;
  return rgb(level(Math.floor(n / 36)), level(Math.floor(n / 6) % 6), level(n % 6));
}

function rgb(r, g, b) {
  const ok = [r, g, b].every((v) => Number.isInteger(v) && v >= 0 && v <= 255);
  return ok ? `rgb(${r}, ${g}, ${b})` : null;
}
