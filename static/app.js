// Mini Agent Web — the page.
//
// How an event reaches the screen:
//   open a session → GET agent/chat (the newest events) → render them →
//   WebSocket "subscribe" after the last seq we have → each pushed event goes
//   through onEvent(), which drops any seq it already has and hands the rest
//   to the Transcript.  A dropped socket reconnects with back-off and
//   resubscribes from the last seq seen, so nothing is missed or doubled.
// The token lives in an HttpOnly cookie set by the server; this script never
// sees it.  Model output is only ever put on the page as text.

import { copyButton, renderMarkdown } from "./markdown.js";
import { TermWriter } from "./terminal.js";

// ---------------------------------------------------------------- labels ---
const LABELS = {
  en: {
    sessions: "Sessions", model: "Model", approvals: "Approvals", new_session: "+ New session",
    mode_auto: "run everything", mode_ask: "ask for bash and edits", mode_ask_all: "ask for every tool",
    load_earlier: "Load earlier events", placeholder: "Ask the agent… (Enter sends, Shift+Enter new line, /help)",
    send: "Send", stop: "Stop", copy: "Copy", copied: "Copied", step: "Step", thinking: "Thinking",
    running: "running…", cut: "[cut off]", show_all: "Show all ({n} lines)", show_less: "Show less",
    allow: "Allow", deny: "Deny", allow_always: "Always allow {tool}", waiting: "Waiting for your approval",
    approval_bar: "The agent wants to run {tool}:", decided_allow: "allowed", decided_deny: "denied",
    live: "connected", down: "reconnecting…", offline: "offline", connecting: "connecting…",
    status_idle: "idle", status_running: "running", status_awaiting_approval: "waiting for approval",
    done_line: "{status} · {steps} step(s) · {inp} in / {out} out tokens",
    done_unreported: "{status} · {steps} step(s) · token usage not reported by the model server",
    done_partly: "{status} · {steps} step(s) · {inp} in / {out} out tokens (some steps unreported)",
    demo: "Offline demo model: answers are canned. Set ANTHROPIC_API_KEY, OPENAI_API_KEY or MINIMAX_API_KEY and restart the server for a real model.",
    auth: "Not signed in: open the link with ?token=… that the server printed when it started.",
    untitled: "New session", delete: "Delete", confirm_delete: "Delete this session and its history?",
    busy: "A run is going in this session: wait for it or press Stop.",
    answered: "That request was already answered.",
    help: "Enter sends · Shift+Enter new line · Esc stops a run\nCtrl+Shift+O new session · Shift+Esc focus the composer · Ctrl+Shift+; copy the last code block (⌘ for Ctrl on a Mac)\n/help this help · /clear new session · /history the conversation · /stats token usage and context",
    stats: "{runs} run(s) · {steps} step(s) · {inp} input / {out} output tokens (in the loaded events) · {context}",
    history_empty: "Nothing yet.", error_prefix: "Error",
    deleted_elsewhere: "That session was deleted (in another tab or by another client).",
    compacted: "context compacted: {before} → {after} tokens",
    compacted_open: "{n} earlier message(s) summarised for the model (all of them stay above); the summary it now reads:",
    context: "context {tokens} / {limit}", context_title: "What the model reads each step, against the limit past which older turns are summarised ({how})",
    context_counted: "as the model server counted it", context_estimated: "estimated",
    context_none: "context not measured yet",
    diff_head: "changes: +{added} −{removed} ({n} lines)",
    rename: "Rename", rename_prompt: "New name for this session",
    files: "Files", files_up: "↑ up", upload: "⬆ upload", uploaded: "Uploaded {name} ({size} bytes) to {path}",
    open_file: "⬇ {path}",
    edit: "edit", regenerate: "regenerate", copy_answer: "copy answer", drop: "drop", queued_tag: "queued: read at the agent's next step",
    keep_queued: "Keep the {n} queued message(s) for the next run? (Cancel drops them.)", forked_from: "⑂ Edited copy of ",
    forked_at: " (the events before #{seq}; the original is unchanged)",
    theme_auto: "Theme: as the system (click for dark)", theme_dark: "Theme: dark (click for light)",
    theme_light: "Theme: light (click to follow the system)",
    notify_on: "Desktop notifications on (click to turn off)", notify_off: "Desktop notifications off (click to turn on)",
    notify_done: "The run finished: {status}", notify_waiting: "Waiting for your approval: {tool}",
    copied_code: "Copied the last code block.", no_code: "No code block yet.",
    copied_answer: "Copied the answer, as Markdown.", not_copied: "The browser did not let the page copy.", search: "Search sessions…",
    export_md: "⬇ Markdown", export_json: "⬇ JSON", export_title: "Download this session",
    tools: "Tools", background: "Background commands", tool_asks: "asks first in ask mode",
    src_builtin: "built-in", src_skills: "skills", job_running: "running",
    job_exited: "exited ({code})", job_gone: "gone (the server restarted)",
    more_sessions: "More sessions", files_more: "… and {n} more (ask the agent, or use bash, to see them)",
  },
  zh: {
    sessions: "会话", model: "模型", approvals: "审批", new_session: "+ 新会话",
    mode_auto: "全部自动执行", mode_ask: "bash 和编辑需确认", mode_ask_all: "所有工具需确认",
    load_earlier: "加载更早的事件", placeholder: "向智能体提问…（Enter 发送，Shift+Enter 换行，/help）",
    send: "发送", stop: "停止", copy: "复制", copied: "已复制", step: "步骤", thinking: "思考",
    running: "运行中…", cut: "[已中断]", show_all: "展开全部（{n} 行）", show_less: "收起",
    allow: "允许", deny: "拒绝", allow_always: "始终允许 {tool}", waiting: "等待你的批准",
    approval_bar: "智能体想要运行 {tool}：", decided_allow: "已允许", decided_deny: "已拒绝",
    live: "已连接", down: "正在重连…", offline: "离线", connecting: "连接中…",
    status_idle: "空闲", status_running: "运行中", status_awaiting_approval: "等待批准",
    done_line: "{status} · {steps} 步 · 输入 {inp} / 输出 {out} tokens",
    done_unreported: "{status} · {steps} 步 · 模型服务器未报告 token 用量",
    done_partly: "{status} · {steps} 步 · 输入 {inp} / 输出 {out} tokens（部分步骤未报告）",
    demo: "离线演示模型：回答是预设的。设置 ANTHROPIC_API_KEY、OPENAI_API_KEY 或 MINIMAX_API_KEY 并重启服务器即可使用真实模型。",
    auth: "未登录：请打开服务器启动时打印的带 ?token=… 的链接。",
    untitled: "新会话", delete: "删除", confirm_delete: "删除此会话及其历史？",
    busy: "此会话正在运行：请等待或点击停止。", answered: "该请求已被回答。",
    help: "Enter 发送 · Shift+Enter 换行 · Esc 停止\nCtrl+Shift+O 新会话 · Shift+Esc 聚焦输入框 · Ctrl+Shift+; 复制最后一个代码块（Mac 上用 ⌘）\n/help 帮助 · /clear 新会话 · /history 对话记录 · /stats 用量与上下文",
    stats: "{runs} 次运行 · {steps} 步 · 输入 {inp} / 输出 {out} tokens（已加载的事件）· {context}",
    history_empty: "还没有内容。", error_prefix: "错误",
    deleted_elsewhere: "该会话已被删除（在另一个标签页或由另一个客户端）。",
    compacted: "上下文已压缩：{before} → {after} tokens",
    compacted_open: "{n} 条较早的消息已为模型总结（全部仍保留在上方）；模型现在读取的摘要：",
    context: "上下文 {tokens} / {limit}", context_title: "模型每一步读取的内容，对比超过即总结旧轮次的上限（{how}）",
    context_counted: "由模型服务器计数", context_estimated: "估算",
    context_none: "上下文尚未测量",
    diff_head: "改动：+{added} −{removed}（{n} 行）",
    rename: "重命名", rename_prompt: "此会话的新名称",
    files: "文件", files_up: "↑ 上级", upload: "⬆ 上传", uploaded: "已上传 {name}（{size} 字节）到 {path}",
    open_file: "⬇ {path}",
    edit: "编辑", regenerate: "重新生成", copy_answer: "复制回答", drop: "撤回", queued_tag: "排队中：智能体下一步读取",
    keep_queued: "保留 {n} 条排队消息到下一次运行吗？（取消则撤回。）", forked_from: "⑂ 编辑的副本，来自 ",
    forked_at: "（#{seq} 之前的事件；原会话不变）",
    theme_auto: "主题：跟随系统（点击切换为深色）", theme_dark: "主题：深色（点击切换为浅色）",
    theme_light: "主题：浅色（点击改为跟随系统）",
    notify_on: "桌面通知已开启（点击关闭）", notify_off: "桌面通知已关闭（点击开启）",
    notify_done: "运行结束：{status}", notify_waiting: "等待你的批准：{tool}",
    copied_code: "已复制最后一个代码块。", no_code: "还没有代码块。",
    copied_answer: "已复制回答（Markdown）。", not_copied: "浏览器不允许页面复制。", search: "搜索会话…",
    export_md: "⬇ Markdown", export_json: "⬇ JSON", export_title: "下载此会话",
    tools: "工具", background: "后台命令", tool_asks: "ask 模式下先确认",
    src_builtin: "内置", src_skills: "技能", job_running: "运行中",
    job_exited: "已退出（{code}）", job_gone: "已消失（服务器已重启）",
    more_sessions: "更多会话", files_more: "……还有 {n} 项（请让智能体或用 bash 查看）",
  },
};
const LANG = (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
function t(key, vars = {}) {
  const text = LABELS[LANG][key] ?? LABELS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, k) => String(vars[k] ?? ""));
}

const HISTORY_TAIL = 200;           // events shown when a session opens
const REVEAL_BEFORE = 20;           // events shown before a search's match, when it is older
const SESSION_PAGE = 100;           // sessions listed at first, and per "More sessions"
const FOLD_LINES = 20;              // tool output longer than this starts folded
const $ = (id) => document.getElementById(id);
const api = (path) => new URL(path, document.baseURI);

// ------------------------------------------------------------- the state ---
const state = {
  config: null,
  sessionId: new URLSearchParams(location.search).get("session"),
  events: [],             // the loaded events of the open session, oldest first
  lastSeq: 0,             // the newest seq we have: the resubscribe point
  loaded: false,          // history fetched; the socket may subscribe
  generation: 0,          // bumps on every session switch; stale answers are dropped
  deleting: null,         // the session this tab is deleting itself
  status: "idle",
  approveMode: "ask",
  ws: null, wsLive: false, retry: 0, retryTimer: null,
};

// ------------------------------------------------------------- transcript ---
class Transcript {
  constructor(container) {
    this.container = container;
    this.reset();
  }

  reset() {
    this.container.replaceChildren();
    this.lastUser = null;
    this.runStart = null;         // ts of the message that began the run going, if loaded
    this.answer = null;           // the last assistant text of the run going
    this.stepEl = null;           // the line of the step going, until it ends
    this.now = this.before = undefined;     // the ts of the last two events applied
    showContext(null);
    this.blocks = new Map();      // message_id -> assistant block
    this.cards = new Map();       // call_id -> tool card
    this.pending = new Map();     // call_id -> approval_request waiting for an answer
    this.step = 0;
    this.dirty = new Set();
    this.frame = 0;
  }

  // Replay many events at once: deltas of a message whose whole `message`
  // is among them are skipped, so a long session renders each answer once.
  renderAll(events) {
    this.reset();
    const finished = new Set(events.filter((e) => e.type === "message" && e.role === "assistant")
      .map((e) => e.message_id));
    const ran = new Set(events.filter((e) => e.type === "tool_result").map((e) => e.call_id));
    const target = this.container;
    this.container = document.createElement("div");
    for (const ev of events) {
      // Fragments whose whole came later are not drawn at all.
      if (ev.type === "delta" && finished.has(ev.message_id)) continue;
      if (ev.type === "tool_output" && ran.has(ev.call_id)) continue;
      this.apply(ev);
    }
    this.flush();
    target.replaceChildren(...this.container.childNodes);
    this.container = target;     // blocks and cards still point at the moved nodes
  }

  add(node) {
    // Queued messages stay last, below what the run is doing, until read.
    const firstQueued = this.container.querySelector(":scope > .queued");
    if (firstQueued && !node.classList?.contains("queued")) this.container.insertBefore(node, firstQueued);
    else this.container.append(node);
    return node;
  }

  lastItem() {
    const items = this.container.querySelectorAll(":scope > :not(.queued)");
    return items[items.length - 1] || null;
  }

  queued() { return [...this.container.querySelectorAll(":scope > .queued")].map((el) => el.dataset.queued); }

  unqueue(id) { this.container.querySelector(`:scope > .queued[data-queued="${CSS.escape(id)}"]`)?.remove(); }

  apply(ev) {
    // A step runs from the event before its first one (the user's message,
    // or the last tool result of the step before) to the event before the
    // next step's first: the model's wait, its answer and its tools.
    [this.before, this.now] = [this.now, ev.ts];
    switch (ev.type) {
      case "queued": {
        const el = this.add(div("user queued"));
        el.dataset.queued = ev.message_id;
        const text = document.createElement("span");
        text.textContent = ev.content;
        const tag = document.createElement("span");
        tag.className = "queued-tag";
        tag.textContent = t("queued_tag");
        const drop = actionButton("drop", "✕", async () => {
          try { await call("DELETE", `agent/sessions/${encodeURIComponent(state.sessionId)}/queue/${encodeURIComponent(ev.message_id)}`); }
          catch (err) { notice(err.message, "error"); }
        });
        el.append(text, tag, drop);
        break;
      }
      case "unqueued": this.unqueue(ev.message_id); break;
      case "message":
        if (ev.role === "user" && ev.queued_id) this.unqueue(ev.queued_id);
        if (ev.role === "user") {
          this.endStep(this.before);        // (a message read mid-run ends a step)
          // A run's steps are counted from its first message on: one read
          // mid-run (queued) goes on counting, as the run's `done` does.
          if (this.runStart === null) this.step = 0;
          const el = this.add(div("user"));
          el.textContent = ev.content;
          el.dataset.seq = ev.seq;
          this.lastUser = ev;
          this.runStart ??= ev.ts;          // a message read mid-run does not restart it
          this.add(actionsRow(actionButton("edit", "✎", () => editMessage(ev))));
        } else {
          const block = this.block(ev.message_id);
          if (ev.content) this.answer = ev.content;   // the run's last words, as Markdown
          block.text = ev.content;
          block.final = true;
          block.incomplete = !!ev.incomplete;
          this.markDirty(block);
        }
        break;
      case "delta": {
        const block = this.block(ev.message_id);
        if (block.final) break;
        if (ev.channel === "thinking") {
          block.thinking += ev.content;
          this.thinkingBox(block).body.append(ev.content);    // a new text node: no re-copy
        } else {
          block.text += ev.content;
          this.markDirty(block);
        }
        break;
      }
      case "thinking": {
        const block = this.block(ev.message_id);
        const box = this.thinkingBox(block);
        box.body.textContent = ev.redacted ? "(redacted)" : ev.content;
        block.thinkingFinal = true;
        break;
      }
      case "tool_call": this.toolCard(ev); break;
      case "approval_request": {
        this.pending.set(ev.call_id, ev);
        const card = this.cards.get(ev.call_id) || this.toolCard({ ...ev, type: "tool_call" });
        card.ask.hidden = false;
        card.el.classList.replace("running", "waiting");        // not running yet
        card.meta.textContent = t("status_awaiting_approval");
        break;
      }
      case "approval": {
        this.pending.delete(ev.call_id);
        const card = this.cards.get(ev.call_id);
        if (card) {
          card.ask.hidden = true;
          card.decision.textContent = t(ev.decision === "allow" ? "decided_allow" : "decided_deny");
          card.el.classList.replace("waiting", "running");
          card.meta.textContent = t("running");
        }
        break;
      }
      case "tool_output": {       // a running command's output so far
        const card = this.cards.get(ev.call_id);
        if (!card) break;
        if (!card.live) {
          card.live = document.createElement("pre");
          card.live.className = "output live";
          card.el.append(card.live);
          card.term = new TermWriter(card.live);
        }
        card.term.write(ev.content);      // new nodes: never re-copies what is there
        card.live.scrollTop = card.live.scrollHeight;      // follow the newest line
        break;
      }
      case "tool_result": {
        const card = this.cards.get(ev.call_id) || this.toolCard({ ...ev, input: {} });
        this.pending.delete(ev.call_id);
        card.live?.remove();      // the result has all of it
        card.ask.hidden = true;
        card.el.classList.remove("running", "waiting");
        card.el.classList.add(ev.is_error ? "error" : "ok");
        card.meta.textContent = formatMs(ev.duration_ms);
        const lines = ev.output.split("\n");
        const pre = document.createElement("pre");
        pre.className = "output";
        new TermWriter(pre).write(ev.output);
        const box = document.createElement("div");         // the output, and its Copy
        box.className = "output-box";
        box.append(pre, copyButton(() => pre.textContent, { copy: t("copy"), copied: t("copied") }));
        card.el.append(box);
        if (lines.length > FOLD_LINES) {
          pre.classList.add("folded");
          const more = document.createElement("button");
          more.type = "button";
          more.className = "link";
          more.textContent = t("show_all", { n: lines.length });
          more.addEventListener("click", () => {
            const folded = pre.classList.toggle("folded");
            more.textContent = folded ? t("show_all", { n: lines.length }) : t("show_less");
          });
          card.el.append(more);
        }
        if (ev.diff) card.el.append(diffView(ev.diff));
        break;
      }
      case "error": {
        // Retries one after another share one line, showing the latest.
        const last = this.lastItem();
        const el = ev.retrying && last?.classList.contains("retry") ? last
          : this.add(div(`notice ${ev.retrying ? "retry" : "error"}`));
        el.textContent = (ev.retrying ? "↻ " : `${t("error_prefix")}: `) + ev.message;
        break;
      }
      case "done": {
        this.endStep(ev.ts);
        this.pending.clear();
        for (const card of this.cards.values()) card.ask.hidden = true;
        for (const block of this.blocks.values()) {
          if (!block.final) { block.final = true; block.incomplete = true; this.markDirty(block); }
        }
        // The summary of a failed run is the error just shown: not twice.
        const last = this.lastItem();
        const said = last?.classList.contains("error") && last.textContent.endsWith(ev.summary);
        const el = this.add(div(`done status-${ev.status}`));
        // usage.reported false: the server sent no counts (llama.cpp in a
        // stream, say): never shown as "0 tokens".
        const inp = ev.usage?.input_tokens ?? 0, out = ev.usage?.output_tokens ?? 0;
        const line = ev.usage?.reported !== false ? "done_line"
          : inp || out ? "done_partly" : "done_unreported";
        // How long the run took, from its message to its end (not for a run a
        // crash ended: its end was written at the next start-up).
        const took = this.runStart !== null && ev.status !== "interrupted"
          ? ` · ${elapsed(this.runStart, ev.ts)}` : "";
        this.runStart = null;
        el.textContent = t(line, { status: ev.status, steps: ev.steps, inp, out }) + took
          + (ev.summary && ev.status !== "done" && !said ? ` — ${ev.summary}` : "");
        const asked = this.lastUser, answer = this.answer;
        this.answer = null;
        const actions = [];
        if (answer) actions.push(actionButton("copy_answer", "❐", () => copyText(answer)));
        if (asked) actions.push(actionButton("regenerate", "↻", () => regenerate(asked)));
        if (actions.length) this.add(actionsRow(...actions));
        this.flush();          // the run is over: show its final state now
        break;
      }
      case "compaction": {
        // The model's view was summarised; the user's loses nothing: every
        // event stays above the divider, and the summary can be opened.
        const details = this.add(document.createElement("details"));
        details.className = "compaction";
        const line = document.createElement("summary");
        line.textContent = `⟲ ${t("compacted", { before: fmt(ev.tokens_before), after: fmt(ev.tokens_after) })}`;
        const intro = div("intro");
        intro.textContent = t("compacted_open", { n: ev.messages });
        const body = div("body");
        body.textContent = ev.summary;
        details.append(line, intro, body);
        break;
      }
      case "context": showContext(ev); break;
      case "forked": {
        // Where this session came from: its events above are a copy.
        const el = this.add(div("forked"));
        const link = document.createElement("a");
        link.href = `?session=${encodeURIComponent(ev.from_session)}`;
        link.textContent = ev.from_title || ev.from_session;
        link.addEventListener("click", (e) => { e.preventDefault(); openSession(ev.from_session); });
        el.append(t("forked_from"), link, t("forked_at", { seq: ev.before_seq }));
        break;
      }
      default: break;   // an event type this page does not know yet: skip it
    }
  }

  block(messageId) {
    let block = this.blocks.get(messageId);
    if (!block) {
      this.endStep(this.before);
      this.step += 1;
      const step = this.add(div("step"));
      step.textContent = `${t("step")} ${this.step}`;
      [this.stepEl, this.stepStart] = [step, this.before];
      const el = this.add(div("assistant streaming"));
      el.dataset.messageId = messageId;
      const md = div("md");
      el.append(md);
      block = { el, md, text: "", thinking: "", final: false, incomplete: false, box: null };
      this.blocks.set(messageId, block);
    }
    return block;
  }

  // When a step ends (the next one starts, or the run does), its line says
  // how long it took.
  endStep(ts) {
    if (!this.stepEl || this.stepStart == null || ts == null) return;
    this.stepEl.textContent += ` · ${elapsed(this.stepStart, ts)}`;
    this.stepEl = null;
  }

  thinkingBox(block) {
    if (!block.box) {
      const details = document.createElement("details");
      details.className = "thinking";
      const summary = document.createElement("summary");
      summary.textContent = `💭 ${t("thinking")}`;
      const body = div("body");
      details.append(summary, body);
      block.el.prepend(details);
      block.box = { details, body };
    }
    return block.box;
  }

  toolCard(ev) {
    const el = this.add(div("tool running"));
    el.dataset.callId = ev.call_id;
    const head = div("head");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `🔧 ${visibleControls(ev.tool)}`;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = t("running");
    const decision = document.createElement("span");
    decision.className = "decision";
    head.append(name, decision, meta);
    const args = div("args");
    args.textContent = formatArgs(ev.tool, ev.input);
    const ask = div("ask");
    ask.hidden = true;
    const label = document.createElement("span");
    label.textContent = t("waiting");
    ask.append(label, ...approvalButtons(ev.call_id, ev.tool));
    el.append(head, args, ask);
    if (["read_file", "write_file", "edit_file"].includes(ev.tool) && typeof ev.input?.path === "string") {
      const link = document.createElement("a");      // the file it touched
      link.className = "file-link";
      link.href = fileUrl(ev.input.path);
      link.download = ev.input.path.split("/").pop();
      link.textContent = t("open_file", { path: ev.input.path });
      head.append(link);
    }
    const card = { el, meta, ask, decision };
    this.cards.set(ev.call_id, card);
    return card;
  }

  // Markdown is re-rendered at most once per animation frame per message.
  // A hidden tab gets no animation frames, so it uses a timer instead.
  markDirty(block) {
    this.dirty.add(block);
    if (this.frame) return;
    this.frame = document.hidden ? setTimeout(() => this.flush(), 100)
                                 : requestAnimationFrame(() => this.flush());
  }

  flush() {
    if (this.frame) { cancelAnimationFrame(this.frame); clearTimeout(this.frame); }
    this.frame = 0;
    for (const block of this.dirty) {
      this.draw(block);
      block.el.classList.toggle("streaming", !block.final);
      if (block.incomplete && !block.el.querySelector(":scope > .cut")) {
        const cut = document.createElement("span");
        cut.className = "cut";
        cut.textContent = t("cut");
        block.el.append(cut);
      }
    }
    this.dirty.clear();
  }

  // A streaming answer is drawn in two parts.  What comes before its last
  // blank line outside a code fence never changes again (Markdown blocks end
  // there), so each such piece is rendered once, appended, and kept; only the
  // tail after it is rendered anew each frame.  A long answer then costs a
  // frame what its last paragraph costs, not what all of it does (rendering
  // and laying out the whole text each frame was quadratic: bench/page_open.py
  // --stream).  The final message is rendered whole, once.
  draw(block) {
    const labels = { copy: t("copy"), copied: t("copied") };
    if (block.final || block.tail === undefined) {
      block.md.replaceChildren();
      block.stable = 0;
      block.tail = [];
    }
    if (block.final) {
      block.md.append(markdown(block.text, labels));
      return;
    }
    for (const node of block.tail) node.remove();
    const end = stableEnd(block.text, block.stable);
    if (end > block.stable) {
      block.md.append(markdown(block.text.slice(block.stable, end), labels));
      block.stable = end;
    }
    const tail = markdown(block.text.slice(block.stable), labels);
    block.tail = [...tail.childNodes];
    block.md.append(tail);
  }
}

// An answer as Markdown; should the renderer ever fail on some text, that
// text is shown as it is rather than the page's drawing stopping there.
function markdown(text, labels) {
  try {
    return renderMarkdown(text, labels);
  } catch (err) {
    console.error("Markdown failed; shown as text:", err);
    const p = document.createElement("p");
    p.className = "plain";
    p.textContent = text;
    return p;
  }
}

// Where the settled part of a streaming text ends: after its last blank line
// outside a code fence (fences opened and closed as renderMarkdown does),
// looking from `from`, itself such a place.  The last line may still grow.
function stableEnd(text, from) {
  const lines = text.slice(from).split("\n");
  let pos = from, end = from, fence = null;
  for (let k = 0; k < lines.length - 1; k++) {
    const line = lines[k];
    pos += line.length + 1;
    if (fence) {
      if (line.trim().startsWith(fence)) fence = null;
    } else {
      const open = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)\s*$/);
      if (open) fence = open[1];
      else if (!line.trim()) end = pos;
    }
  }
  return end;
}

const fmt = (n) => Number(n || 0).toLocaleString("en-US");

// What a file tool changed: a unified diff, each line coloured by its sign,
// folded when long. Lines are text nodes: the file's content is never HTML.
function diffView(diff) {
  const lines = diff.replace(/\n$/, "").split("\n");
  const added = lines.filter((l) => l.startsWith("+") && !l.startsWith("+++")).length;
  const removed = lines.filter((l) => l.startsWith("-") && !l.startsWith("---")).length;
  const box = document.createElement("details");
  box.className = "diff";
  box.open = lines.length <= FOLD_LINES * 2;
  const head = document.createElement("summary");
  head.textContent = t("diff_head", { added, removed, n: lines.length });
  const pre = document.createElement("pre");
  for (const line of lines) {
    const span = document.createElement("span");
    span.className = line.startsWith("@@") ? "hunk" : line.startsWith("+++") || line.startsWith("---") ? "file"
      : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "ctx";
    span.textContent = line || " ";        // a block per line: no newline inside
    pre.append(span);
  }
  box.append(head, pre);
  return box;
}

// The context meter: the newest `context` event of the open session.
function showContext(ev) {
  const box = $("context"), bar = $("context-bar");
  if (!ev) {
    box.textContent = t("context_none");
    box.title = "";
    bar.value = 0;
    return;
  }
  box.textContent = t("context", { tokens: (ev.estimated ? "~" : "") + fmt(ev.tokens), limit: fmt(ev.limit) });
  box.title = t("context_title", { how: t(ev.estimated ? "context_estimated" : "context_counted") });
  bar.max = ev.limit;
  bar.value = Math.min(ev.tokens, ev.limit);
}

function div(className) {
  const el = document.createElement("div");
  el.className = className;
  return el;
}

// What a tool call will do, as the user is asked to allow it: its control
// and direction-changing characters made visible, so that a command holding
// a "\r" or a right-to-left override cannot show itself as another.
function formatArgs(tool, input) {
  if (tool === "bash" && input && typeof input.command === "string") {
    return visibleControls(`$ ${input.command}`);
  }
  let text;
  try { text = JSON.stringify(input ?? {}, null, 2); } catch { text = String(input); }
  return visibleControls(text);
}

// Control characters (but line ends and tabs) as the symbols for them (ESC
// as ␛), and the invisible ones that change the text's direction by name.
function visibleControls(text) {
  return text.replace(/[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, (c) => {
    const n = c.charCodeAt(0);
    return n < 0x20 ? String.fromCharCode(0x2400 + n) : n === 0x7f ? "\u2421"
      : `⟨U+${n.toString(16).toUpperCase().padStart(4, "0")}⟩`;
  });
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${ms} ms`;
}

// The time between two events' ts (Unix seconds), as formatMs says it.
const elapsed = (from, to) => formatMs(Math.max(0, Math.round((to - from) * 1000)));

function approvalButtons(callId, tool) {
  const make = (label, decision, cls) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = cls;
    b.textContent = label;
    b.dataset.decision = decision;
    b.addEventListener("click", () => answer(callId, decision));
    return b;
  };
  return [make(t("allow"), "allow", "primary"), make(t("deny"), "deny", "danger"),
          make(t("allow_always", { tool }), "allow_always", "")];
}

const transcript = new Transcript($("events"));

// ------------------------------------------------------------------ HTTP ---
async function call(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(api(path), init);
  const data = resp.status === 204 ? null : await resp.json().catch(() => null);
  if (resp.status === 401) showAuth();
  if (!resp.ok) {
    const err = new Error(data?.error?.message || `HTTP ${resp.status}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function showAuth() {
  const banner = $("auth-banner");
  banner.textContent = t("auth");
  banner.hidden = false;
}

function notice(text, kind = "info") {
  const el = div(`notice ${kind}`);
  el.textContent = text;
  $("events").append(el);
  scrollToEnd(true);
}

// --------------------------------------------------------------- sessions ---
async function openSession(sessionId, { push = true, found = null } = {}) {
  const gen = ++state.generation;
  state.sessionId = sessionId;
  state.events = [];
  state.lastSeq = 0;
  state.loaded = false;
  transcript.reset();
  showExport();
  $("load-earlier").hidden = true;
  const url = new URL(location.href);
  if (sessionId) url.searchParams.set("session", sessionId); else url.searchParams.delete("session");
  if (push && url.href !== location.href) history.pushState(null, "", url);
  if (!sessionId) {
    showBackground();
    setStatus("idle");
    state.approveMode = state.config?.approve ?? "ask";
    $("approve-mode").value = state.approveMode;
    document.title = "Mini Agent";
    highlightSession();
    return;
  }
  let data;
  try {
    data = await call("GET", `agent/chat?session_id=${encodeURIComponent(sessionId)}&tail=${HISTORY_TAIL}`);
  } catch (err) {
    if (gen !== state.generation) return;
    notice(`${t("error_prefix")}: ${err.message}`, "error");
    return;
  }
  if (gen !== state.generation) return;
  state.events = data.events;
  state.lastSeq = data.events.length ? data.events[data.events.length - 1].seq : data.last_seq;
  state.approveMode = data.approve_mode;
  $("approve-mode").value = data.approve_mode;
  document.title = `${data.title || t("untitled")} · Mini Agent`;
  $("load-earlier").hidden = !(data.events.length && data.events[0].seq > 1);
  transcript.renderAll(state.events);
  setStatus(data.status);
  state.loaded = true;
  highlightSession();
  if (!found) scrollToEnd(true);
  subscribe();
  if (found) await reveal(found, gen);
  showBackground();          // after the history: it must not hold up the newest events
}

// A session opened from a search result: the message the search found is
// brought into view (with the events since it, if the newest ones do not
// reach back that far) and marked for a moment.
async function reveal(found, gen) {
  if (found.seq < (state.events[0]?.seq ?? 0)) {
    try {
      await loadEarlier(Math.max(0, found.seq - 1 - REVEAL_BEFORE));
    } catch (err) {
      notice(`${t("error_prefix")}: ${err.message}`, "error");
      return;
    }
    if (gen !== state.generation) return;
  }
  const el = found.role === "user"
    ? $("events").querySelector(`.user[data-seq="${found.seq}"]`)
    : $("events").querySelector(`[data-message-id="${CSS.escape(found.message_id || "")}"]`);
  if (!el) return;
  el.scrollIntoView({ block: "center" });
  el.classList.add("found-here");
  setTimeout(() => el.classList.remove("found-here"), 2500);
}

async function loadEarlier(from) {
  const first = state.events[0]?.seq;
  if (!first || first <= 1) return;
  const gen = state.generation;
  const after = from ?? Math.max(0, first - 1 - HISTORY_TAIL);
  const data = await call("GET", `agent/chat?session_id=${encodeURIComponent(state.sessionId)}`
                          + `&after=${after}&limit=${first - 1 - after}`);
  if (gen !== state.generation) return;
  const box = $("transcript");
  const fromBottom = box.scrollHeight - box.scrollTop;
  state.events = data.events.concat(state.events);
  transcript.renderAll(state.events);
  $("load-earlier").hidden = !(state.events[0].seq > 1);
  box.scrollTop = box.scrollHeight - fromBottom;      // keep the reader where they were
}

// The list shows the newest SESSION_PAGE sessions, and "More sessions"
// brings the next page (GET agent/sessions?limit=&after=): with thousands of
// sessions, drawing them all at every run's end was a long task of seconds.
// A refresh keeps as many shown as were.
async function refreshSessions() {
  const q = $("session-search").value.trim();
  const limit = Math.min(Math.max(SESSION_PAGE, $("sessions").children.length), 1000);
  const data = await sessionsPage(q, limit);
  if (!data || q !== $("session-search").value.trim()) return;   // a newer search is on its way
  $("sessions").replaceChildren(...data.sessions.map(sessionItem));
  showMoreSessions(data.next);
  highlightSession();
}

async function moreSessions() {
  const q = $("session-search").value.trim();
  const data = await sessionsPage(q, SESSION_PAGE, $("more-sessions").dataset.next);
  if (!data || q !== $("session-search").value.trim()) return;
  const list = $("sessions");
  const shown = new Set([...list.children].map((li) => li.dataset.sessionId));
  // A session that moved up meanwhile is shown once, where it was.
  list.append(...data.sessions.filter((s) => !shown.has(s.session_id)).map(sessionItem));
  showMoreSessions(data.next);
  highlightSession();
}

async function sessionsPage(q, limit, after) {
  const query = new URLSearchParams({ limit });
  if (q) query.set("q", q);
  if (after) query.set("after", after);
  try { return await call("GET", `agent/sessions?${query}`); } catch { return null; }
}

function showMoreSessions(next) {
  const more = $("more-sessions");
  more.hidden = !next;
  more.dataset.next = next || "";
}

function sessionItem(s) {
  const li = document.createElement("li");
  li.dataset.sessionId = s.session_id;
  const a = document.createElement("a");
  a.href = `?session=${encodeURIComponent(s.session_id)}`;
  a.textContent = s.title || t("untitled");
  a.title = s.title;
  a.addEventListener("click", (e) => {
    e.preventDefault();
    openSession(s.session_id, { found: s.found });
    closeDrawer();
  });
  const status = document.createElement("span");
  showStatus(status, s.status);
  const button = (kind, glyph, onClick) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = kind;
    b.textContent = glyph;
    b.title = t(kind);
    b.setAttribute("aria-label", `${t(kind)} ${s.title}`);
    b.addEventListener("click", onClick);
    return b;
  };
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.append(button("rename", "✎", () => renameSession(li, a, s.session_id, s.title)),
                 button("delete", "✕", () => deleteSession(s.session_id)));
  li.append(a, status, actions);
  if (s.found) {
    // Where the search's text is: the words around it, the text marked
    // (each a text node: a message's words never become markup).
    const where = document.createElement("div");
    where.className = "found";
    const mark = document.createElement("mark");
    mark.textContent = s.found.text;
    where.append(s.found.before, mark, s.found.after);
    li.append(where);
  }
  return li;
}

// Rename in place: the title becomes a field; Enter saves, Escape or
// leaving it cancels.
function renameSession(li, link, sessionId, title) {
  const field = document.createElement("input");
  field.className = "rename-field";
  field.value = title || "";
  field.maxLength = 200;
  field.setAttribute("aria-label", t("rename_prompt"));
  link.replaceWith(field);
  field.focus();
  field.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const name = field.value.trim();
    if (save && name && name !== title) {
      try { await call("PATCH", `agent/sessions/${encodeURIComponent(sessionId)}`, { title: name }); }
      catch (err) { notice(err.message, "error"); }
    }
    refreshSessions();
  };
  field.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    else if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); finish(false); }
  });
  field.addEventListener("blur", () => finish(false));
}

// The open session's downloads (the cookie signs them, as every request).
function showExport() {
  const sid = state.sessionId;
  for (const [id, format] of [["export-md", "md"], ["export-json", "json"]]) {
    const a = $(id);
    a.hidden = !sid;
    if (sid) a.href = api(`agent/sessions/${encodeURIComponent(sid)}/export?format=${format}`).href;
  }
}

// On a narrow screen the sessions list is a drawer over the transcript: it
// starts closed and closes once a session is picked.
const NARROW = window.matchMedia("(max-width: 700px)");
function closeDrawer() {
  if (NARROW.matches) $("sidebar").classList.add("hidden");
}

function showStatus(badge, status) {
  badge.className = `status ${status}`;
  badge.textContent = status === "idle" ? "" : t(`status_${status}`);
}

function highlightSession() {
  for (const li of $("sessions").children) {
    li.classList.toggle("current", li.dataset.sessionId === state.sessionId);
  }
}

async function deleteSession(sessionId) {
  if (!confirm(t("confirm_delete"))) return;
  state.deleting = sessionId;        // its session_deleted frame is no news here
  try { await call("DELETE", `agent/sessions/${encodeURIComponent(sessionId)}`); }
  catch (err) { notice(err.message, "error"); }
  if (sessionId === state.sessionId) await openSession(null);
  refreshSessions();
}

// The open session was deleted elsewhere (another tab, another client).
async function onDeleted(sessionId) {
  if (sessionId !== state.sessionId || sessionId === state.deleting) return;
  await openSession(null);
  notice(t("deleted_elsewhere"), "error");
  refreshSessions();
}

// ------------------------------------------------------------- WebSocket ---
function connect() {
  const url = api("agent/ws");
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  setConn("connecting");
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.addEventListener("open", () => {
    state.retry = 0;
    state.wsLive = true;
    setConn("live");
    subscribe();
  });
  ws.addEventListener("message", (msg) => {
    let frame;
    try { frame = JSON.parse(msg.data); } catch { return; }
    if (typeof frame.seq === "number") onEvent(frame);
    else if (frame.type === "subscribed" && frame.session_id === state.sessionId) setStatus(frame.status);
    else if (frame.type === "session_deleted") onDeleted(frame.session_id);
    else if (frame.type === "error") console.warn("server:", frame.message);
  });
  ws.addEventListener("close", (e) => {
    if (state.ws !== ws) return;
    state.wsLive = false;
    setConn("down");
    // 4008: we fell behind; catch up from the store at once.  Otherwise back
    // off (0.5 s, 1 s, 2 s … 10 s) so a restarting server is not hammered.
    // 4004: the session was deleted (said in the frame before): reconnect now.
    const delay = e.code === 4008 || e.code === 4004 ? 0 : Math.min(10000, 500 * 2 ** state.retry++);
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(connect, delay);
  });
}

function subscribe() {
  if (!state.wsLive || !state.sessionId || !state.loaded) return;
  state.ws.send(JSON.stringify({ type: "subscribe", session_id: state.sessionId, after: state.lastSeq }));
}

// ------------------------------------------------------------- files ---
// The workspace, browsed (GET agent/files), downloaded (agent/files/raw) and
// uploaded to (PUT agent/files/raw, by the button or by dropping files on
// the composer).  Names are text; links are built with URL-encoded paths.
const files = { path: "" };
const fileUrl = (path) => api(`agent/files/raw?path=${encodeURIComponent(path)}`).href;

async function showFiles(path = files.path) {
  let data;
  try { data = await call("GET", `agent/files?path=${encodeURIComponent(path)}`); }
  catch (err) { notice(err.message, "error"); return; }
  files.path = path;
  $("files-path").textContent = `/${path}`;
  $("files-up").hidden = !path;
  $("files").replaceChildren(...data.entries.map((e) => {
    const li = document.createElement("li");
    const full = path ? `${path}/${e.name}` : e.name;
    if (e.type === "dir") {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = `📁 ${e.name}`;
      b.addEventListener("click", () => showFiles(full));
      li.append(b);
    } else if (e.type === "file") {
      const a = document.createElement("a");
      a.href = fileUrl(full);
      a.download = e.name;
      a.textContent = e.name;
      const size = document.createElement("span");
      size.className = "size";
      size.textContent = fmt(e.size);
      li.append(a, size);
    } else {
      li.textContent = `${e.name} (${e.type})`;
    }
    return li;
  }));
  if (data.more) {
    const li = document.createElement("li");
    li.className = "more";
    li.textContent = t("files_more", { n: fmt(data.more) });
    $("files").append(li);
  }
}

async function upload(list) {
  for (const file of list) {
    const path = files.path ? `${files.path}/${file.name}` : file.name;
    const r = await fetch(fileUrl(path), { method: "PUT", body: file,
      headers: { "content-type": "application/octet-stream" }, credentials: "same-origin" });
    if (r.ok) notice(t("uploaded", { name: file.name, size: fmt(file.size), path: `/${files.path}` }));
    else {
      let message = r.statusText;
      try { message = (await r.json()).error.message; } catch { /* not JSON */ }
      notice(`${t("error_prefix")}: ${message}`, "error");
    }
  }
  showFiles();
}

// --------------------------------------------------- tools and background ---
// What the model may use (GET agent/tools): by source, with each MCP
// server's state; and the open session's background commands, with their
// latest output, refreshed while one runs.
async function showTools() {
  let info;
  try { info = await call("GET", "agent/tools"); } catch { return; }
  const box = $("tools");
  box.replaceChildren();
  const groups = new Map();
  for (const tool of info.tools) {
    if (!groups.has(tool.source)) groups.set(tool.source, []);
    groups.get(tool.source).push(tool);
  }
  for (const [source, tools] of groups) {
    const head = div("group");
    head.textContent = source === "built-in" ? t("src_builtin") : source === "skills" ? t("src_skills") : source;
    box.append(head);
    for (const tool of tools) {
      const el = div(`tool-name${tool.asks_first ? " asks" : ""}`);
      el.textContent = tool.name;
      el.title = tool.description + (tool.asks_first ? ` (${t("tool_asks")})` : "");
      box.append(el);
    }
  }
  for (const server of info.mcp_servers) {
    const el = div(`server ${server.state}`);
    const spoken = server.protocol ? `, MCP ${server.protocol}` : "";
    el.textContent = `MCP ${server.name} (${server.transport}${spoken}): ${server.state}` + (server.error ? ` — ${server.error}` : "");
    box.append(el);
  }
}

let backgroundTimer = 0;
async function showBackground() {
  clearTimeout(backgroundTimer);
  const sid = state.sessionId;
  const panel = $("background-panel"), list = $("background");
  if (!sid) { panel.hidden = true; return; }
  let data;
  try { data = await call("GET", `agent/sessions/${encodeURIComponent(sid)}/background`); } catch { return; }
  if (sid !== state.sessionId) return;
  panel.hidden = data.jobs.length === 0;
  if (data.jobs.length && !list.children.length) panel.open = true;
  list.replaceChildren(...data.jobs.map((job) => {
    const li = document.createElement("li");
    li.className = `job${job.running ? " running" : ""}`;
    li.dataset.bashId = job.bash_id;
    const cmd = document.createElement("span");
    cmd.className = "cmd";
    cmd.textContent = `$ ${job.command}`;
    const st = document.createElement("span");
    st.className = "state";
    st.textContent = ` · ${job.gone ? t("job_gone") : job.running ? t("job_running") : t("job_exited", { code: job.exit_code })}`;
    li.append(cmd, st);
    if (job.output_tail) {
      const out = document.createElement("pre");
      new TermWriter(out).write(job.output_tail);
      li.append(out);
    }
    return li;
  }));
  if (data.jobs.some((j) => j.running)) backgroundTimer = setTimeout(showBackground, 2000);
}

function onEvent(ev) {
  if (ev.session_id !== state.sessionId || ev.seq <= state.lastSeq) return;   // old or doubled
  state.lastSeq = ev.seq;
  state.events.push(ev);
  const stick = nearBottom();
  transcript.apply(ev);
  if (ev.type === "message" && ev.role === "user") setStatus("running");
  else if (ev.type === "approval_request") {
    setStatus("awaiting_approval");
    tellHidden(t("notify_waiting", { tool: ev.tool }));
  }
  else if (ev.type === "approval") setStatus("running");
  else if (ev.type === "done") {
    setStatus("idle");
    refreshSessions();
    tellHidden(t("notify_done", { status: ev.status }));
  }
  else if (ev.type === "tool_result" || ev.type === "approval") updateApprovalBar();
  if (ev.type === "tool_result" && ev.tool.startsWith("bash")) showBackground();
  scrollToEnd(stick);
}

function setConn(kind) {
  const el = $("conn");
  el.className = `conn ${kind === "live" ? "live" : kind === "down" ? "down" : ""}`;
  el.textContent = t(kind) + (state.status !== "idle" ? ` · ${t(`status_${state.status}`)}` : "");
  el.dataset.state = kind;
}

function setStatus(status) {
  state.status = status;
  // The list is fetched now and then; the open session's badge follows live.
  for (const li of $("sessions").children) {
    if (li.dataset.sessionId === state.sessionId) showStatus(li.querySelector(".status"), status);
  }
  const running = status !== "idle";
  const send = $("send");
  send.textContent = running ? t("stop") : t("send");
  send.classList.toggle("danger", running);
  send.classList.toggle("primary", !running);
  send.dataset.mode = running ? "stop" : "send";
  setConn(state.wsLive ? "live" : ($("conn").dataset.state || "connecting"));
  updateApprovalBar();
}

function updateApprovalBar() {
  const bar = $("approval-bar");
  const [first] = transcript.pending.values();
  if (!first) { bar.hidden = true; bar.replaceChildren(); return; }
  if (bar.dataset.callId === first.call_id && !bar.hidden) return;
  bar.dataset.callId = first.call_id;
  const label = document.createElement("strong");
  label.textContent = t("approval_bar", { tool: visibleControls(first.tool) });
  const what = div("what");
  what.textContent = formatArgs(first.tool, first.input);
  bar.replaceChildren(label, what, ...approvalButtons(first.call_id, first.tool));
  bar.hidden = false;
}

// ----------------------------------------------------------------- actions ---
async function send(text) {
  const body = { message: text };
  if (state.sessionId) body.session_id = state.sessionId;
  // While a run goes, a message is queued: the agent reads it at its next step.
  if (state.sessionId && state.status !== "idle") body.queue = true;
  else body.approve_mode = $("approve-mode").value;
  let data;
  try {
    data = await call("POST", "agent/chat", body);
  } catch (err) {
    notice(err.status === 409 ? t("busy") : `${t("error_prefix")}: ${err.message}`, "error");
    return false;
  }
  if (data.queued) return true;
  if (data.session_id !== state.sessionId) {
    await openSession(data.session_id);
  }
  // A fast run may have ended (its `done` pushed) before this answer came:
  // only a run not seen to end is still running.
  const ended = state.events.some((e) => e.type === "done" && e.seq > data.seq);
  if (!ended) setStatus("running");
  refreshSessions();
  return true;
}

async function stop() {
  if (!state.sessionId) return;
  // Queued messages: kept for the next run, or dropped, as the user says.
  const waiting = transcript.queued();
  if (waiting.length && !window.confirm(t("keep_queued", { n: waiting.length }))) {
    for (const id of waiting) {
      try { await call("DELETE", `agent/sessions/${encodeURIComponent(state.sessionId)}/queue/${encodeURIComponent(id)}`); }
      catch { /* read by the agent meanwhile */ }
    }
  }
  try { await call("POST", "agent/cancel", { session_id: state.sessionId }); }
  catch (err) { if (err.status !== 409) notice(err.message, "error"); }
}

async function answer(callId, decision) {
  try {
    await call("POST", "agent/approve", { session_id: state.sessionId, call_id: callId, decision });
  } catch (err) {
    notice(err.status === 409 ? t("answered") : err.message, "error");
  }
}

function slash(line) {
  const cmd = line.split(/\s+/)[0].toLowerCase();
  if (cmd === "/help") notice(t("help"));
  else if (cmd === "/clear") openSession(null);
  else if (cmd === "/history") {
    const lines = [];
    for (const ev of state.events) {
      if (ev.type === "message" && !ev.incomplete) {
        lines.push(`${ev.role === "user" ? "you" : "agent"}: ${ev.content.replace(/\s+/g, " ").slice(0, 160)}`);
      } else if (ev.type === "tool_call") lines.push(`  🔧 ${ev.tool} ${formatArgs(ev.tool, ev.input).slice(0, 120)}`);
    }
    notice(lines.join("\n") || t("history_empty"));
  } else if (cmd === "/stats") {
    const done = state.events.filter((e) => e.type === "done");
    const sum = (f) => done.reduce((n, e) => n + (f(e) || 0), 0);
    notice(t("stats", { runs: done.length, steps: sum((e) => e.steps),
      inp: sum((e) => e.usage?.input_tokens), out: sum((e) => e.usage?.output_tokens),
      context: $("context").textContent }));
  } else notice(t("help"));
}

// ------------------------------------------------ edit and regenerate ---
// Both fork the session (POST agent/sessions/{id}/fork): the new session
// holds the events before the message, the original stays as it was.
// "Edit" then puts the message in the composer; "regenerate" sends it again.
function actionsRow(...buttons) {
  const row = div("msg-actions");
  row.append(...buttons);
  return row;
}

function actionButton(kind, symbol, act) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `action ${kind}`;
  b.textContent = `${symbol} ${t(kind)}`;
  b.addEventListener("click", act);
  return b;
}

async function forkBefore(ev) {
  if (!state.sessionId || state.status !== "idle") { notice(t("busy"), "error"); return null; }
  try {
    const forked = await call("POST", `agent/sessions/${encodeURIComponent(state.sessionId)}/fork`,
      { before_seq: ev.seq });
    await openSession(forked.session_id);
    refreshSessions();
    return forked;
  } catch (err) { notice(err.message, "error"); return null; }
}

async function editMessage(ev) {
  if (await forkBefore(ev)) {
    $("input").value = ev.content;
    $("input").focus();
  }
}

async function regenerate(ev) {
  if (await forkBefore(ev)) await send(ev.content);
}

// ------------------------------------------------- theme and being told ---
// The theme follows the system unless the user picked one (remembered).
// When a run ends or waits for approval while the tab is hidden, the title
// flashes until the tab is seen, and a desktop notification says so if the
// user turned them on (silent: no sound).
const THEMES = ["auto", "dark", "light"];
function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  $("theme").title = t(`theme_${theme}`);
  $("theme").textContent = theme === "dark" ? "☾" : theme === "light" ? "☀" : "◐";
}

function notifyOn() { return localStorage.getItem("mini-agent-notify") === "on"; }
function showNotify() {
  const on = notifyOn();
  $("notify").textContent = on ? "🔔" : "🔕";
  $("notify").title = t(on ? "notify_on" : "notify_off");
  $("notify").setAttribute("aria-pressed", String(on));
}

let flashing = 0;
function tellHidden(text) {
  if (!document.hidden) return;
  if (!flashing) {
    const plain = document.title;
    let lit = false;
    flashing = setInterval(() => { lit = !lit; document.title = lit ? `● ${text}` : plain; }, 1000);
    document.title = `● ${text}`;
    const stop = () => {
      if (document.hidden) return;
      clearInterval(flashing);
      flashing = 0;
      document.title = plain;
      document.removeEventListener("visibilitychange", stop);
    };
    document.addEventListener("visibilitychange", stop);
  }
  if (notifyOn() && "Notification" in window && Notification.permission === "granted") {
    new Notification("Mini Agent", { body: text, silent: true, tag: state.sessionId || "mini-agent" });
  }
}

function copyText(text) {
  navigator.clipboard.writeText(text)
    .then(() => notice(t("copied_answer")), () => notice(t("not_copied"), "error"));
}

function copyLastCode() {
  const blocks = $("events").querySelectorAll(".codeblock code");
  if (!blocks.length) { notice(t("no_code")); return; }
  navigator.clipboard.writeText(blocks[blocks.length - 1].textContent)
    .then(() => notice(t("copied_code")), () => notice(t("no_code"), "error"));
}

// ----------------------------------------------------------------- helpers ---
function nearBottom() {
  const box = $("transcript");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

// One scroll a frame, however many events came in it: each scroll makes the
// browser lay the page out.
let scrollFrame = 0;
function scrollToEnd(really) {
  if (!really || scrollFrame) return;
  const box = $("transcript");
  scrollFrame = requestAnimationFrame(() => { scrollFrame = 0; box.scrollTop = box.scrollHeight; });
}

function applyLabels() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
}

// -------------------------------------------------------------- start-up ---
function wire() {
  const input = $("input");
  $("composer").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    // The Stop button stops; Enter with a message while a run goes queues it.
    if ($("send").dataset.mode === "stop" && (e.submitter === $("send") || !text)) { stop(); return; }
    if (!text) return;
    if (text.startsWith("/")) { input.value = ""; slash(text); return; }
    input.value = "";
    if (!(await send(text))) input.value = text;
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    const mod = e.ctrlKey || e.metaKey;
    if (e.key === "Escape" && e.shiftKey) { e.preventDefault(); input.focus(); }
    else if (e.key === "Escape" && state.status !== "idle") { e.preventDefault(); stop(); }
    else if (mod && e.shiftKey && e.code === "KeyO") {
      e.preventDefault();
      openSession(null);
      input.focus();
    } else if (mod && e.shiftKey && e.code === "Semicolon") { e.preventDefault(); copyLastCode(); }
  });
  $("theme").addEventListener("click", () => {
    const now = localStorage.getItem("mini-agent-theme") || "auto";
    const next = THEMES[(THEMES.indexOf(now) + 1) % THEMES.length];
    localStorage.setItem("mini-agent-theme", next);
    applyTheme(next);
  });
  $("notify").addEventListener("click", async () => {
    if (notifyOn()) localStorage.setItem("mini-agent-notify", "off");
    else {
      const answer = "Notification" in window ? await Notification.requestPermission() : "denied";
      localStorage.setItem("mini-agent-notify", answer === "granted" ? "on" : "off");
    }
    showNotify();
  });
  $("new-session").addEventListener("click", () => { openSession(null); closeDrawer(); input.focus(); });
  $("more-sessions").addEventListener("click", moreSessions);
  $("load-earlier").addEventListener("click", () => loadEarlier());
  $("files-panel").addEventListener("toggle", () => { if ($("files-panel").open) showFiles(); });
  $("files-up").addEventListener("click", () => showFiles(files.path.split("/").slice(0, -1).join("/")));
  $("files-input").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
  const composer = $("composer");
  composer.addEventListener("dragover", (e) => {
    if (![...e.dataTransfer.types].includes("Files")) return;
    e.preventDefault();
    composer.classList.add("dropping");
  });
  composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
  composer.addEventListener("drop", (e) => {
    if (!e.dataTransfer.files.length) return;
    e.preventDefault();
    composer.classList.remove("dropping");
    upload([...e.dataTransfer.files]);
  });
  let searching = 0;
  $("session-search").addEventListener("input", () => {
    clearTimeout(searching);
    searching = setTimeout(refreshSessions, 200);
  });
  $("toggle-sidebar").addEventListener("click", () => $("sidebar").classList.toggle("hidden"));
  $("approve-mode").addEventListener("change", async (e) => {
    state.approveMode = e.target.value;
    if (state.sessionId) {
      try { await call("PATCH", `agent/sessions/${encodeURIComponent(state.sessionId)}`, { approve_mode: e.target.value }); }
      catch (err) { notice(err.message, "error"); }
    }
  });
  window.addEventListener("popstate", () => {
    openSession(new URLSearchParams(location.search).get("session"), { push: false });
  });
}

async function main() {
  applyLabels();
  applyTheme(localStorage.getItem("mini-agent-theme") || "auto");
  showNotify();
  wire();
  closeDrawer();
  try {
    state.config = await call("GET", "agent/config");
  } catch {
    setConn("offline");
    return;           // the auth banner says what to do
  }
  const model = $("model");
  model.textContent = state.config.demo ? `demo · ${state.config.model}` : `${state.config.provider} · ${state.config.model}`;
  if (state.config.demo) {
    $("demo-banner").textContent = t("demo");
    $("demo-banner").hidden = false;
  }
  connect();
  showTools();
  // Asked again at each opening: an MCP server's tools and state change.
  $("tools-panel").addEventListener("toggle", () => { if ($("tools-panel").open) showTools(); });
  await openSession(state.sessionId, { push: false });
  refreshSessions();
  setInterval(refreshSessions, 15000);
  $("input").focus();
}

main();
