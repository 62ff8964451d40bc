//! `hubbub chat`: a full-screen terminal client.
//!
//! Two tasks: the network task owns a reconnecting [`Session`] (reconnect with backoff,
//! then `sync`) and turns user commands into requests; the UI loop draws with ratatui
//! and reads keys with crossterm. They talk over channels, so a slow network never
//! freezes the screen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use crossterm::event::{Event as TermEvent, EventStream, KeyCode, KeyEvent, KeyModifiers};
use futures_util::StreamExt;
use hubbub_client::{ClientError, ConnectOptions, Session, SessionEvent};
use hubbub_protocol::reply::{SearchHit, SearchPage};
use hubbub_protocol::{ClientFrame, Conv, MemberEvent, Message, ServerFrame};
use ratatui::layout::{Constraint, Direction, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, List, ListItem, Paragraph, Wrap};
use ratatui::{DefaultTerminal, Frame};
use tokio::sync::mpsc;

#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    /// Server URL, e.g. ws://127.0.0.1:8080
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    /// Guest name (guest mode).
    #[arg(long, conflicts_with = "token")]
    user: Option<String>,
    /// A token from POST /api/login (or `hubbub token`).
    #[arg(long)]
    token: Option<String>,
    /// Room to join and open at start.
    #[arg(long)]
    room: Option<String>,
}

/// What the UI asks the network task to do.
#[derive(Debug)]
enum Command {
    Send {
        conv: String,
        text: String,
        reply_to: Option<u64>,
    },
    React {
        conv: String,
        seq: u64,
        emoji: String,
        on: bool,
    },
    Search(String),
    Join(String),
    Leave(String),
    Typing(String),
    Older {
        conv: String,
        before: u64,
    },
    Open(String),
}

/// What the network task tells the UI.
#[derive(Debug)]
enum NetEvent {
    Frame(ServerFrame),
    Page(String, Vec<Message>),
    Joined(String),
    Left(String),
    Status(String),
    Error(String),
    /// Our own reaction, set (or cleared) once the server said ok.
    Reacted {
        conv: String,
        seq: u64,
        emoji: String,
        on: bool,
    },
    /// Search results: the query and one line per hit.
    Found(String, Vec<SearchHit>),
}

pub(crate) fn run(args: ChatArgs) -> anyhow::Result<()> {
    let opts = match (&args.user, &args.token) {
        (_, Some(t)) => ConnectOptions::with_token(&args.url, t),
        (Some(u), None) => ConnectOptions::guest(&args.url, u),
        (None, None) => bail!("give --user NAME (guest mode) or --token JWT"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let session = Session::connect(opts)
            .await
            .with_context(|| format!("connecting to {}", args.url))?;
        let me = session
            .client()
            .map(|c| c.welcome().user.clone())
            .unwrap_or_default();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let search = Searcher::new(&args.url, args.user.as_deref(), args.token.as_deref());
        tokio::spawn(network(session, search, cmd_rx, ev_tx));
        if let Some(room) = &args.room {
            let _ = cmd_tx.send(Command::Join(room.clone()));
        }
        // The terminal is restored on every way out, including errors and panics.
        let terminal = ratatui::init();
        let result = ui(terminal, App::new(me), cmd_tx, ev_rx).await;
        ratatui::restore();
        result
    })
}

/// Owns the session: forwards pushes to the UI and runs the UI's commands.
async fn network(
    mut session: Session,
    search: Searcher,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<NetEvent>,
) {
    // Conversations the user has, so that a reconnect catches all of them up.
    if let Some(c) = session.client() {
        if let Ok(list) = c.sync(BTreeMap::new(), Some(1)).await {
            for (conv, last) in list.conversations {
                session.follow(&conv, last);
                let _ = events.send(NetEvent::Joined(conv.clone()));
                if let Some(c) = session.client() {
                    if let Ok(page) = c.history(&conv, None, None, Some(50)).await {
                        let _ = events.send(NetEvent::Page(conv, page.messages));
                    }
                }
            }
        }
    }
    loop {
        while let Ok(cmd) = commands.try_recv() {
            if let Err(e) = command(&mut session, &search, cmd, &events).await {
                let _ = events.send(NetEvent::Error(e));
            }
        }
        match session.next(Duration::from_millis(50)).await {
            Ok(SessionEvent::Frame(f)) => {
                let _ = events.send(NetEvent::Frame(f));
            }
            Ok(SessionEvent::Disconnected(_)) => {
                let _ = events.send(NetEvent::Status("reconnecting…".into()));
            }
            Ok(SessionEvent::Reconnected { missed }) => {
                let _ = events.send(NetEvent::Status(format!(
                    "connected (caught up {missed} missed)"
                )));
            }
            Err(ClientError::Timeout) => {}
            Err(e) => {
                let _ = events.send(NetEvent::Error(format!("connection lost for good: {e}")));
                return;
            }
        }
        if events.is_closed() {
            return;
        }
    }
}

const NOT_CONNECTED: &str = "not connected; try again in a moment";

/// The newest page of `conv`; the session follows it from now on (a reconnect catches
/// it up).
async fn newest_page(session: &mut Session, conv: &str) -> Result<Vec<Message>, String> {
    let Some(client) = session.client() else {
        return Err(NOT_CONNECTED.into());
    };
    let page = client
        .history(conv, None, None, Some(50))
        .await
        .map_err(|e| e.to_string())?;
    // Followed from the page on (a conversation followed already stays as it is).
    let before_page = page.messages.first().map_or(0, |m| m.seq.saturating_sub(1));
    session.follow(conv, before_page);
    session.saw(&page.messages);
    Ok(page.messages)
}

/// `GET /api/search` of the server the chat connects to (HTTP beside its WebSocket).
struct Searcher {
    http: reqwest::Client,
    /// `http://HOST:PORT/api/search`, or why there is none.
    url: Result<String, String>,
    user: Option<String>,
    token: Option<String>,
}

impl Searcher {
    fn new(ws_url: &str, user: Option<&str>, token: Option<&str>) -> Searcher {
        let base = ws_url.trim_end_matches('/').trim_end_matches("/ws");
        let url = match base.split_once("://") {
            Some(("ws", rest)) => Ok(format!("http://{rest}/api/search")),
            Some((scheme, _)) => Err(format!(
                "/search needs a ws:// server URL (this one is {scheme}://)"
            )),
            None => Err(format!("/search: cannot read the server URL {ws_url}")),
        };
        Searcher {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            url,
            user: user.map(String::from),
            token: token.map(String::from),
        }
    }

    async fn search(&self, q: &str, conv: Option<&str>) -> Result<Vec<SearchHit>, String> {
        let url = self.url.clone()?;
        let mut query: Vec<(&str, &str)> = vec![("q", q), ("limit", "50")];
        if let Some(conv) = conv {
            query.push(("conv", conv));
        }
        if let (None, Some(user)) = (&self.token, &self.user) {
            query.push(("user", user));
        }
        let mut req = self.http.get(url).query(&query);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let r = req
            .send()
            .await
            .map_err(|e| format!("search failed: {e}"))?;
        if !r.status().is_success() {
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            return Err(format!(
                "search: {}",
                body["message"].as_str().unwrap_or("refused")
            ));
        }
        let page: SearchPage = r.json().await.map_err(|e| format!("search: {e}"))?;
        Ok(page.results)
    }
}

async fn command(
    session: &mut Session,
    search: &Searcher,
    cmd: Command,
    events: &mpsc::UnboundedSender<NetEvent>,
) -> Result<(), String> {
    if let Command::Search(q) = cmd {
        let hits = search.search(&q, None).await?;
        let _ = events.send(NetEvent::Found(q, hits));
        return Ok(());
    }
    let Some(client) = session.client() else {
        return Err(NOT_CONNECTED.into());
    };
    let err = |e: ClientError| e.to_string();
    match cmd {
        Command::Search(_) => {}
        Command::React {
            conv,
            seq,
            emoji,
            on,
        } => {
            client.react(&conv, seq, &emoji, on).await.map_err(err)?;
            let _ = events.send(NetEvent::Reacted {
                conv,
                seq,
                emoji,
                on,
            });
        }
        Command::Send {
            conv,
            text,
            reply_to,
        } => {
            // The sending session gets only the `ok`: show the message from it.
            let cid = client.new_client_msg_id();
            let content = serde_json::Value::String(text.clone());
            let sent = client
                .send_full(
                    &conv,
                    &cid,
                    hubbub_protocol::ContentType::Text,
                    content,
                    reply_to,
                )
                .await
                .map_err(err)?;
            // Its reply reference and mentions as stored.
            let stored = client
                .history(&conv, None, Some(sent.seq - 1), Some(1))
                .await
                .ok()
                .and_then(|p| p.messages.into_iter().next());
            let mine = Message {
                conv: sent.conv,
                seq: sent.seq,
                msg_id: sent.msg_id,
                from: client.welcome().user.clone(),
                client_msg_id: sent.client_msg_id,
                content_type: hubbub_protocol::ContentType::Text,
                content: Some(serde_json::Value::String(text)),
                ts: sent.ts,
                recalled: false,
                edited_at: None,
                reply_to: stored.as_ref().and_then(|m| m.reply_to.clone()),
                reactions: Default::default(),
                mentions: stored.map(|m| m.mentions).unwrap_or_default(),
            };
            session.saw(std::slice::from_ref(&mine));
            let _ = events.send(NetEvent::Frame(ServerFrame::Message(mine)));
        }
        Command::Join(room) => {
            client.join(&room).await.map_err(err)?;
            let conv = Conv::room_id(&room);
            let messages = newest_page(session, &conv).await?;
            let _ = events.send(NetEvent::Joined(conv.clone()));
            let _ = events.send(NetEvent::Page(conv, messages));
        }
        Command::Leave(room) => {
            client.leave(&room).await.map_err(err)?;
            let _ = events.send(NetEvent::Left(Conv::room_id(&room)));
        }
        Command::Open(conv) => {
            let messages = newest_page(session, &conv).await?;
            let _ = events.send(NetEvent::Page(conv, messages));
        }
        Command::Older { conv, before } => {
            let page = client
                .history(&conv, Some(before), None, Some(50))
                .await
                .map_err(err)?;
            let _ = events.send(NetEvent::Page(conv, page.messages));
        }
        Command::Typing(conv) => {
            client
                .send_no_reply(ClientFrame::Typing { id: None, conv })
                .await
                .map_err(err)?;
        }
    }
    Ok(())
}

/// One conversation on screen.
#[derive(Default)]
struct ConvView {
    messages: BTreeMap<u64, Message>,
    unread: u64,
    online: Option<u64>,
}

struct App {
    me: String,
    convs: BTreeMap<String, ConvView>,
    current: Option<String>,
    input: String,
    status: String,
    notice: Option<String>,
    typing: HashMap<String, (String, Instant)>,
    online_users: HashSet<String>,
    /// Lines scrolled up from the bottom of the message pane.
    scroll: u16,
    last_typing_sent: Option<Instant>,
    /// Search results on screen instead of the conversation (Esc closes them).
    found: Option<(String, Vec<SearchHit>)>,
    quit: bool,
}

impl App {
    fn new(me: String) -> App {
        App {
            me,
            convs: BTreeMap::new(),
            current: None,
            input: String::new(),
            status: "connected".into(),
            notice: None,
            typing: HashMap::new(),
            online_users: HashSet::new(),
            scroll: 0,
            last_typing_sent: None,
            found: None,
            quit: false,
        }
    }

    fn open(&mut self, conv: &str) {
        self.current = Some(conv.to_string());
        self.scroll = 0;
        if let Some(v) = self.convs.get_mut(conv) {
            v.unread = 0;
        }
    }

    fn net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Frame(f) => self.frame(f),
            NetEvent::Page(conv, msgs) => {
                let v = self.convs.entry(conv).or_default();
                for m in msgs {
                    v.messages.insert(m.seq, m);
                }
            }
            NetEvent::Joined(conv) => {
                self.convs.entry(conv.clone()).or_default();
                if self.current.is_none() || conv.starts_with("room:") {
                    self.open(&conv);
                }
            }
            NetEvent::Left(conv) => {
                self.convs.remove(&conv);
                if self.current.as_deref() == Some(&conv) {
                    self.current = self.convs.keys().next().cloned();
                }
            }
            NetEvent::Status(s) => self.status = s,
            NetEvent::Error(e) => self.notice = Some(e),
            NetEvent::Reacted {
                conv,
                seq,
                emoji,
                on,
            } => {
                let me = self.me.clone();
                self.reaction(&conv, seq, &me, &emoji, on);
            }
            NetEvent::Found(q, hits) => {
                self.notice = Some(format!("{} found for {q:?}; Esc closes", hits.len()));
                self.found = Some((q, hits));
            }
        }
    }

    /// `user` set (`on`) or cleared `emoji` on message `seq` of `conv`.
    fn reaction(&mut self, conv: &str, seq: u64, user: &str, emoji: &str, on: bool) {
        let Some(m) = self.message(conv, seq) else {
            return;
        };
        let users = m.reactions.entry(emoji.to_string()).or_default();
        users.retain(|u| u != user);
        if on {
            users.push(user.to_string());
            users.sort();
        }
        if users.is_empty() {
            m.reactions.remove(emoji);
        }
    }

    fn frame(&mut self, f: ServerFrame) {
        match f {
            ServerFrame::Message(m) => {
                let current = self.current.as_deref() == Some(m.conv.as_str());
                self.typing.remove(&m.conv);
                let v = self.convs.entry(m.conv.clone()).or_default();
                if !current && m.from != self.me {
                    v.unread += 1;
                }
                v.messages.insert(m.seq, m);
            }
            ServerFrame::Recalled { conv, seq, .. } => {
                if let Some(m) = self.message(&conv, seq) {
                    m.recalled = true;
                    m.content = None;
                }
            }
            ServerFrame::Edited {
                conv,
                seq,
                content,
                edited_at,
            } => {
                if let Some(m) = self.message(&conv, seq) {
                    m.content = Some(content);
                    m.edited_at = Some(edited_at);
                }
            }
            ServerFrame::Member {
                conv,
                user,
                event,
                online,
                by,
            } => {
                self.convs.entry(conv).or_default().online = Some(online);
                self.notice = Some(match event {
                    MemberEvent::Joined => format!("{user} joined"),
                    MemberEvent::Left => format!("{user} left"),
                    MemberEvent::Removed => {
                        format!("{user} was removed by {}", by.unwrap_or_default())
                    }
                });
            }
            ServerFrame::Reaction {
                conv,
                seq,
                user,
                emoji,
                on,
            } => self.reaction(&conv, seq, &user, &emoji, on),
            ServerFrame::Reactions {
                conv,
                seq,
                reactions,
            } => {
                if let Some(m) = self.message(&conv, seq) {
                    m.reactions = reactions;
                }
            }
            ServerFrame::Presence { user, online } => {
                if online {
                    self.online_users.insert(user);
                } else {
                    self.online_users.remove(&user);
                }
            }
            ServerFrame::Typing { conv, user } => {
                self.typing.insert(conv, (user, Instant::now()));
            }
            ServerFrame::Notice { text, from } => {
                self.notice = Some(format!("notice from {from}: {text}"));
            }
            ServerFrame::Kicked { reason } => self.notice = Some(format!("kicked: {reason}")),
            ServerFrame::Error { message, .. } => self.notice = Some(message),
            _ => {}
        }
    }

    fn message(&mut self, conv: &str, seq: u64) -> Option<&mut Message> {
        self.convs.get_mut(conv)?.messages.get_mut(&seq)
    }

    /// Handles a key; returns a command for the network task, if any.
    fn key(&mut self, k: KeyEvent) -> Option<Command> {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        match k.code {
            KeyCode::Char('c') | KeyCode::Char('d') if ctrl => {
                self.quit = true;
                None
            }
            KeyCode::Esc if self.found.is_some() => {
                self.found = None;
                self.notice = None;
                None
            }
            KeyCode::Esc => {
                self.quit = true;
                None
            }
            KeyCode::Tab => {
                let keys: Vec<String> = self.convs.keys().cloned().collect();
                if !keys.is_empty() {
                    let i = self
                        .current
                        .as_ref()
                        .and_then(|c| keys.iter().position(|k| k == c))
                        .map_or(0, |i| (i + 1) % keys.len());
                    let conv = keys[i].clone();
                    self.open(&conv);
                    // Load the history of a conversation opened for the first time.
                    if self.convs.get(&conv).is_some_and(|v| v.messages.is_empty()) {
                        return Some(Command::Open(conv));
                    }
                }
                None
            }
            KeyCode::PageUp => {
                self.scroll = self.scroll.saturating_add(10);
                let conv = self.current.clone()?;
                let oldest = *self.convs.get(&conv)?.messages.keys().next()?;
                (oldest > 1).then_some(Command::Older {
                    conv,
                    before: oldest,
                })
            }
            KeyCode::PageDown => {
                self.scroll = self.scroll.saturating_sub(10);
                None
            }
            KeyCode::Backspace => {
                self.input.pop();
                None
            }
            KeyCode::Enter => {
                let line = std::mem::take(&mut self.input);
                self.submit(line.trim())
            }
            KeyCode::Char(c) => {
                self.input.push(c);
                let conv = self.current.clone()?;
                let due = self
                    .last_typing_sent
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(3));
                if due && !self.input.starts_with('/') {
                    self.last_typing_sent = Some(Instant::now());
                    return Some(Command::Typing(conv));
                }
                None
            }
            _ => None,
        }
    }

    fn submit(&mut self, line: &str) -> Option<Command> {
        self.notice = None;
        if line.is_empty() {
            return None;
        }
        let Some(rest) = line.strip_prefix('/') else {
            let Some(conv) = self.current.clone() else {
                self.notice = Some("join a room first: /join NAME".into());
                return None;
            };
            self.scroll = 0;
            self.last_typing_sent = None;
            return Some(Command::Send {
                conv,
                text: line.to_string(),
                reply_to: None,
            });
        };
        let (cmd, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        let arg = arg.trim();
        match (cmd, arg.is_empty()) {
            ("quit" | "q", _) => {
                self.quit = true;
                None
            }
            ("join", false) => Some(Command::Join(arg.to_string())),
            ("leave", false) => Some(Command::Leave(arg.to_string())),
            ("leave", true) => match self
                .current
                .as_deref()
                .and_then(|c| c.strip_prefix("room:"))
            {
                Some(room) => Some(Command::Leave(room.to_string())),
                None => {
                    self.notice = Some("/leave NAME".into());
                    None
                }
            },
            ("search", false) => Some(Command::Search(arg.to_string())),
            ("reply", false) => {
                let conv = self.current.clone()?;
                match arg
                    .split_once(' ')
                    .map(|(s, t)| (s.parse::<u64>(), t.trim()))
                {
                    Some((Ok(seq), text)) if !text.is_empty() => Some(Command::Send {
                        conv,
                        text: text.to_string(),
                        reply_to: Some(seq),
                    }),
                    _ => {
                        self.notice = Some("/reply SEQ TEXT".into());
                        None
                    }
                }
            }
            ("react", false) => {
                let conv = self.current.clone()?;
                match arg
                    .split_once(' ')
                    .map(|(s, e)| (s.parse::<u64>(), e.trim()))
                {
                    Some((Ok(seq), emoji)) if !emoji.is_empty() => {
                        // Reacting again with the same emoji takes it back.
                        let on = !self
                            .convs
                            .get(&conv)
                            .and_then(|v| v.messages.get(&seq))
                            .and_then(|m| m.reactions.get(emoji))
                            .is_some_and(|users| users.contains(&self.me));
                        Some(Command::React {
                            conv,
                            seq,
                            emoji: emoji.to_string(),
                            on,
                        })
                    }
                    _ => {
                        self.notice = Some("/react SEQ EMOJI".into());
                        None
                    }
                }
            }
            ("dm", false) => {
                let conv = Conv::dm_id(&self.me, arg);
                self.convs.entry(conv.clone()).or_default();
                self.open(&conv);
                Some(Command::Open(conv))
            }
            _ => {
                self.notice = Some(
                    "commands: /join ROOM, /dm USER, /leave [ROOM], /reply SEQ TEXT, /react SEQ EMOJI, /search WORDS, /quit; Tab switches, PgUp loads older"
                        .into(),
                );
                None
            }
        }
    }
}

async fn ui(
    mut terminal: DefaultTerminal,
    mut app: App,
    commands: mpsc::UnboundedSender<Command>,
    mut events: mpsc::UnboundedReceiver<NetEvent>,
) -> anyhow::Result<()> {
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while !app.quit {
        terminal.draw(|f| draw(f, &app))?;
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => app.net(ev),
                None => bail!("the connection task ended"),
            },
            key = keys.next() => match key {
                Some(Ok(TermEvent::Key(k))) => {
                    if let Some(cmd) = app.key(k) {
                        let _ = commands.send(cmd);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
            _ = tick.tick() => {
                app.typing.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(5));
            }
        }
    }
    Ok(())
}

/// Message text as shown: control characters (terminal escapes) removed.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn hhmm(ts: i64) -> String {
    let minutes = ts.div_euclid(60_000).rem_euclid(24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

fn describe(m: &Message) -> String {
    if m.recalled {
        return "(recalled)".into();
    }
    let body = match &m.content {
        Some(serde_json::Value::String(s)) => clean(s),
        Some(v) => {
            let name = v
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("attachment");
            format!("[{}: {}]", m.content_type.as_str(), clean(name))
        }
        None => String::new(),
    };
    let mut out = String::new();
    if let Some(r) = &m.reply_to {
        let quoted = r
            .excerpt
            .as_deref()
            .map(clean)
            .unwrap_or_else(|| "…".into());
        out.push_str(&format!("[↪ #{} {}: {}] ", r.seq, clean(&r.from), quoted));
    }
    out.push_str(&body);
    if m.edited_at.is_some() {
        out.push_str(" (edited)");
    }
    if !m.reactions.is_empty() {
        let counts: Vec<String> = m
            .reactions
            .iter()
            .map(|(e, users)| format!("{}{}", clean(e), users.len()))
            .collect();
        out.push_str(&format!("  [{}]", counts.join(" ")));
    }
    out
}

fn title(conv: &str, me: &str) -> String {
    match Conv::parse(conv) {
        Ok(Conv::Room(name)) => format!("#{name}"),
        Ok(c @ Conv::Dm(..)) => format!("@{}", c.dm_peer(me).unwrap_or(conv)),
        Err(_) => conv.to_string(),
    }
}

fn draw(f: &mut Frame, app: &App) {
    let cols = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Length(26), Constraint::Min(20)])
        .split(f.area());
    let items: Vec<ListItem> = app
        .convs
        .iter()
        .map(|(conv, v)| {
            let mut spans = vec![Span::raw(title(conv, &app.me))];
            if let Ok(Conv::Dm(..)) = Conv::parse(conv) {
                let peer = Conv::parse(conv)
                    .ok()
                    .and_then(|c| c.dm_peer(&app.me).map(String::from));
                if peer.is_some_and(|p| app.online_users.contains(&p)) {
                    spans.push(Span::styled(" ●", Style::default().fg(Color::Green)));
                }
            }
            if v.unread > 0 {
                spans.push(Span::styled(
                    format!(" ({})", v.unread),
                    Style::default().fg(Color::Yellow),
                ));
            }
            let style = if app.current.as_deref() == Some(conv.as_str()) {
                Style::default().add_modifier(Modifier::REVERSED)
            } else {
                Style::default()
            };
            ListItem::new(Line::from(spans)).style(style)
        })
        .collect();
    f.render_widget(
        List::new(items).block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(" hubbub: {} ", app.me)),
        ),
        cols[0],
    );

    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Min(3),
            Constraint::Length(1),
            Constraint::Length(3),
        ])
        .split(cols[1]);
    let (heading, lines) = match (
        &app.found,
        app.current
            .as_ref()
            .and_then(|c| app.convs.get(c).map(|v| (c, v))),
    ) {
        (Some((q, hits)), _) => (
            format!(" search: {} ", clean(q)),
            hits.iter()
                .map(|h| {
                    Line::from(vec![
                        Span::styled(
                            format!("{} #{}", title(&h.conv, &app.me), h.seq),
                            Style::default().fg(Color::DarkGray),
                        ),
                        Span::raw(" "),
                        Span::styled(
                            format!("{}:", clean(&h.from)),
                            Style::default().add_modifier(Modifier::BOLD),
                        ),
                        Span::raw(format!(" {}", clean(&h.highlight))),
                    ])
                })
                .collect(),
        ),
        (None, found) => match found {
            Some((conv, v)) => {
                let online = v
                    .online
                    .map(|n| format!(" · {n} online"))
                    .unwrap_or_default();
                let lines: Vec<Line> = v
                    .messages
                    .values()
                    .map(|m| {
                        // Messages that mention me stand out.
                        let body = if m.mentions.contains(&app.me) {
                            Style::default().fg(Color::Yellow)
                        } else {
                            Style::default()
                        };
                        Line::from(vec![
                            Span::styled(
                                format!("{} #{}", hhmm(m.ts), m.seq),
                                Style::default().fg(Color::DarkGray),
                            ),
                            Span::raw(" "),
                            Span::styled(
                                format!("{}:", clean(&m.from)),
                                Style::default().add_modifier(Modifier::BOLD),
                            ),
                            Span::styled(format!(" {}", describe(m)), body),
                        ])
                    })
                    .collect();
                (format!(" {}{online} ", title(conv, &app.me)), lines)
            }
            None => (
                " no conversation ".to_string(),
                vec![Line::from("Type /join ROOM or /dm USER to start.")],
            ),
        },
    };
    let height = rows[0].height.saturating_sub(2);
    let total = lines.len() as u16;
    let top = total.saturating_sub(height).saturating_sub(app.scroll);
    f.render_widget(
        Paragraph::new(lines)
            .block(Block::default().borders(Borders::ALL).title(heading))
            .wrap(Wrap { trim: false })
            .scroll((top, 0)),
        rows[0],
    );

    let typing = app
        .current
        .as_ref()
        .and_then(|c| app.typing.get(c))
        .map(|(u, _)| format!("{} is typing…  ", clean(u)))
        .unwrap_or_default();
    let status = match &app.notice {
        Some(n) => format!("{typing}{}", clean(n)),
        None => format!("{typing}{}", app.status),
    };
    f.render_widget(
        Paragraph::new(status).style(Style::default().fg(Color::Cyan)),
        rows[1],
    );
    f.render_widget(
        Paragraph::new(app.input.as_str()).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" message (Enter sends, /quit) "),
        ),
        rows[2],
    );
    let x = rows[2].x + 1 + app.input.chars().count() as u16;
    f.set_cursor_position((x.min(rows[2].right().saturating_sub(2)), rows[2].y + 1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_in_messages_are_neutralized() {
        assert_eq!(clean("hi\x1b[2Jthere\n"), "hi [2Jthere ");
        assert_eq!(hhmm(0), "00:00");
        assert_eq!(hhmm(13 * 3_600_000 + 5 * 60_000), "13:05");
    }

    #[test]
    fn replies_and_reactions_are_shown_and_a_second_react_takes_it_back() {
        let mut app = App::new("alice".into());
        app.net(NetEvent::Joined("room:t".into()));
        let msg = |seq: u64| Message {
            conv: "room:t".into(),
            seq,
            msg_id: format!("m{seq}"),
            from: "bob".into(),
            client_msg_id: format!("c{seq}"),
            content_type: hubbub_protocol::ContentType::Text,
            content: Some(serde_json::json!("hi")),
            ts: 0,
            recalled: false,
            edited_at: None,
            reply_to: None,
            reactions: Default::default(),
            mentions: Vec::new(),
        };
        let mut reply = msg(2);
        reply.reply_to = Some(Box::new(hubbub_protocol::ReplyRef {
            seq: 1,
            from: "bob".into(),
            excerpt: Some("hi".into()),
        }));
        app.net(NetEvent::Page("room:t".into(), vec![msg(1), reply]));
        app.frame(ServerFrame::Reaction {
            conv: "room:t".into(),
            seq: 1,
            user: "bob".into(),
            emoji: "👍".into(),
            on: true,
        });
        app.net(NetEvent::Reacted {
            conv: "room:t".into(),
            seq: 1,
            emoji: "👍".into(),
            on: true,
        });
        let v = &app.convs["room:t"];
        assert_eq!(describe(&v.messages[&1]), "hi  [👍2]");
        assert_eq!(describe(&v.messages[&2]), "[↪ #1 bob: hi] hi");
        assert!(matches!(
            app.submit("/react 1 👍"),
            Some(Command::React { on: false, .. })
        ));
    }

    #[test]
    fn slash_commands() {
        let mut app = App::new("alice".into());
        assert!(matches!(app.submit("/join lobby"), Some(Command::Join(r)) if r == "lobby"));
        assert!(matches!(app.submit("/dm bob"), Some(Command::Open(c)) if c == "dm:alice:bob"));
        assert_eq!(app.current.as_deref(), Some("dm:alice:bob"));
        assert!(
            matches!(app.submit("hello"), Some(Command::Send { conv, .. }) if conv == "dm:alice:bob")
        );
        assert!(matches!(
            app.submit("/reply 3 sure"),
            Some(Command::Send { reply_to: Some(3), text, .. }) if text == "sure"
        ));
        assert!(matches!(
            app.submit("/react 2 👍"),
            Some(Command::React { seq: 2, on: true, emoji, .. }) if emoji == "👍"
        ));
        assert!(
            matches!(app.submit("/search deploy plan"), Some(Command::Search(q)) if q == "deploy plan")
        );
        assert!(app.submit("/reply x").is_none());
        assert!(app.submit("/nonsense").is_none());
        assert!(app.notice.is_some());
        app.submit("/quit");
        assert!(app.quit);
    }
}
