// A 1:1 voice/video call over WebRTC. Offer, answer, ICE candidates and hangup travel as
// `signal` frames through the server (`kind`: ring, offer, answer, candidate, hangup);
// media flows peer to peer, through the STUN/TURN servers of the server's `welcome`
// (`ice_servers`) when it names any.
//
// A call rings for at most RING_MS: then the caller sees "No answer", its camera and
// microphone stop, and the callee's ringing ends. It also ends at once when the other
// side goes offline before it is connected, and either side may end it while it rings
// (the caller cancels, the callee declines: both send `hangup`).

/** How long a call rings before it is given up. */
const RING_MS = 40000;

/** The ring time: RING_MS, or a shorter one a test sets on `window.HUBBUB_RING_MS`. */
function ringMs() {
  const t = Number(window.HUBBUB_RING_MS);
  return Number.isFinite(t) && t > 0 ? Math.min(t, RING_MS) : RING_MS;
}

export class Calls {
  /**
   * @param {object} ui { send(frame) -> Promise|void, setState(text, phase, info), showVideo(local, remote), onEnd() }
   */
  constructor(ui) {
    this.ui = ui;
    /** RTCIceServer list from the server's `welcome`. */
    this.iceServers = [];
    // { id, peer, pc, local, role, video, phase, text, queued: [], remoteSet, incomingOffer,
    //   accepted, answered, connected, muted, cameraOff, ringTimer }
    this.call = null;
    /** Ids of calls that ended here: their late `ring` or `offer` never rings again. */
    this.endedIds = [];
  }

  get active() { return this.call !== null; }

  isCurrent(id) { return this.call && this.call.id === id; }

  /** Shows the call's state (and what its toggles can do). */
  show(text, phase) {
    const call = this.call;
    call.text = text;
    call.phase = phase;
    this.ui.setState(text, phase, this.info(call));
  }

  info(call) {
    const tracks = call.local ? call.local.getTracks() : [];
    return {
      video: call.video,
      hasAudio: tracks.some((t) => t.kind === 'audio'),
      hasVideo: tracks.some((t) => t.kind === 'video'),
      muted: !!call.muted,
      cameraOff: !!call.cameraOff,
    };
  }

  refresh() {
    if (this.call) this.show(this.call.text, this.call.phase);
  }

  /** Starts a call: with the camera when `video`, else audio only (no camera asked for). */
  async start(peer, video = true) {
    if (this.call) return;
    const id = 'c-' + randomId();
    this.call = { id, peer, pc: null, local: null, role: 'caller', video, queued: [], remoteSet: false };
    this.show(video ? `Calling ${peer}…` : `Calling ${peer} (audio)…`, 'calling');
    this.call.ringTimer = setTimeout(() => this.noAnswer(id), ringMs());
    try {
      await this.ui.send({ type: 'signal', to: peer, call_id: id, kind: 'ring', data: { video } });
      const local = await navigator.mediaDevices.getUserMedia({ audio: true, video });
      if (!this.isCurrent(id)) { stopStream(local); return; }
      this.call.local = local;
      const pc = this.makePeer(id, peer);
      for (const t of local.getTracks()) pc.addTrack(t, local);
      this.ui.showVideo(local, null);
      this.refresh();
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      await this.ui.send({ type: 'signal', to: peer, call_id: id, kind: 'offer', data: { type: offer.type, sdp: offer.sdp } });
    } catch (e) {
      this.fail(id, e);
    }
  }

  /** Nobody answered in time: give up, and stop the callee's ringing. */
  noAnswer(id) {
    const call = this.call;
    if (!this.isCurrent(id) || call.answered || call.connected) return;
    this.tell(call, 'hangup', { reason: 'timeout' });
    this.end('No answer', false);
  }

  /** An incoming call nobody accepted in time (the caller's own timer normally ends it first). */
  missed(id) {
    const call = this.call;
    if (!this.isCurrent(id) || call.accepted) return;
    this.tell(call, 'hangup', { reason: 'timeout' });
    this.end(`Missed call from ${call.peer}`, false);
  }

  /** `user` went offline: a call with them that is not connected yet is over. */
  peerOffline(user) {
    const call = this.call;
    if (!call || call.peer !== user || call.connected) return;
    this.end(`${user} is offline`, false);
  }

  makePeer(id, peer) {
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.call.pc = pc;
    pc.onicecandidate = (ev) => {
      if (!ev.candidate || !this.isCurrent(id)) return;
      Promise.resolve(this.ui.send({ type: 'signal', to: peer, call_id: id, kind: 'candidate', data: ev.candidate.toJSON() }))
        .catch(() => {});
    };
    pc.ontrack = (ev) => {
      if (!this.isCurrent(id)) return;
      const stream = ev.streams[0] || new MediaStream([ev.track]);
      this.ui.showVideo(this.call.local, stream);
    };
    pc.onconnectionstatechange = () => {
      if (!this.isCurrent(id)) return;
      const s = pc.connectionState;
      if (s === 'connected') {
        this.call.connected = true;
        clearTimeout(this.call.ringTimer);
        this.show(`Call connected with ${peer}`, 'connected');
      } else if (s === 'connecting') this.show('Connecting…', 'connecting');
      else if (s === 'failed') this.end('Call failed', true);
      else if (s === 'disconnected') this.show('Reconnecting call…', 'connecting');
    };
    return pc;
  }

  /** A `signal` frame from the server. */
  async onSignal(f) {
    const { from, call_id: id, kind, data } = f;
    if (kind === 'ring' || kind === 'offer') {
      // The offer of a call declined while it rang (before the offer came) is late, not new.
      if (this.endedIds.includes(id)) return;
      if (this.call && this.call.id !== id) {
        // Busy: refuse the second call.
        Promise.resolve(this.ui.send({ type: 'signal', to: from, call_id: id, kind: 'hangup', data: { reason: 'busy' } })).catch(() => {});
        return;
      }
      if (!this.call) {
        const video = !(data && data.video === false) && !(kind === 'offer' && data && typeof data.sdp === 'string' && !/\nm=video /.test(data.sdp));
        this.call = { id, peer: from, pc: null, local: null, role: 'callee', video, queued: [], remoteSet: false, incomingOffer: null };
        this.show(video ? `Incoming call from ${from}` : `Incoming audio call from ${from}`, 'incoming');
        this.call.ringTimer = setTimeout(() => this.missed(id), ringMs() + 5000);
      }
      if (kind === 'offer') {
        this.call.incomingOffer = data;
        if (this.call.accepted) await this.answer();
      }
      return;
    }
    if (!this.isCurrent(id)) return;
    const call = this.call;
    try {
      if (kind === 'answer' && call.pc) {
        call.answered = true;
        clearTimeout(call.ringTimer);
        await call.pc.setRemoteDescription({ type: 'answer', sdp: data.sdp });
        call.remoteSet = true;
        await this.flushCandidates();
        // The connection may already be up by now; never step back from "connected".
        if (this.isCurrent(id) && call.pc.connectionState !== 'connected') this.show('Connecting…', 'connecting');
      } else if (kind === 'candidate') {
        if (call.pc && call.remoteSet) await call.pc.addIceCandidate(data);
        else call.queued.push(data);
      } else if (kind === 'hangup') {
        const reason = data && data.reason;
        const why = reason === 'busy' ? `${call.peer} is busy`
          : reason === 'declined' ? `${call.peer} declined`
            : reason === 'cancelled' ? `${call.peer} cancelled the call`
              : reason === 'timeout' && call.role === 'callee' ? `Missed call from ${call.peer}`
                : reason === 'timeout' ? 'No answer'
                  : 'Call ended';
        this.end(why, false);
      }
    } catch (e) {
      this.fail(id, e);
    }
  }

  async flushCandidates() {
    const call = this.call;
    if (!call || !call.pc) return;
    const q = call.queued.splice(0);
    for (const c of q) {
      try { await call.pc.addIceCandidate(c); } catch { /* stale candidate */ }
    }
  }

  /** The callee accepts. */
  async accept() {
    if (!this.call || this.call.role !== 'callee' || this.call.accepted) return;
    this.call.accepted = true;
    clearTimeout(this.call.ringTimer);
    this.show('Connecting…', 'connecting');
    if (this.call.incomingOffer) await this.answer();
  }

  async answer() {
    const call = this.call;
    const id = call.id;
    if (call.pc) return;
    try {
      const local = await navigator.mediaDevices.getUserMedia({ audio: true, video: call.video });
      if (!this.isCurrent(id)) { stopStream(local); return; }
      call.local = local;
      const pc = this.makePeer(id, call.peer);
      for (const t of local.getTracks()) pc.addTrack(t, local);
      this.ui.showVideo(local, null);
      this.refresh();
      await pc.setRemoteDescription({ type: 'offer', sdp: call.incomingOffer.sdp });
      call.remoteSet = true;
      await this.flushCandidates();
      const answer = await pc.createAnswer();
      await pc.setLocalDescription(answer);
      await this.ui.send({ type: 'signal', to: call.peer, call_id: id, kind: 'answer', data: { type: answer.type, sdp: answer.sdp } });
    } catch (e) {
      this.fail(id, e);
    }
  }

  /** Microphone on/off (the track stays: unmuting needs no new permission). */
  toggleMute() {
    const call = this.call;
    if (!call || !call.local) return;
    call.muted = !call.muted;
    for (const t of call.local.getAudioTracks()) t.enabled = !call.muted;
    this.refresh();
  }

  /** Camera on/off: the other side sees no picture while it is off. */
  toggleCamera() {
    const call = this.call;
    if (!call || !call.local) return;
    call.cameraOff = !call.cameraOff;
    for (const t of call.local.getVideoTracks()) t.enabled = !call.cameraOff;
    this.refresh();
  }

  decline() {
    if (!this.call) return;
    this.hangup('declined');
  }

  /** Ends the call and tells the peer (a call still ringing is cancelled). */
  hangup(reason) {
    const call = this.call;
    if (!call) return;
    const ringing = call.role === 'caller' && !call.answered && !call.connected;
    const why = reason || (ringing ? 'cancelled' : 'hangup');
    this.tell(call, 'hangup', { reason: why });
    this.end(why === 'cancelled' ? 'Call cancelled' : why === 'declined' ? 'Call declined' : 'Call ended', false);
  }

  tell(call, kind, data) {
    try {
      Promise.resolve(this.ui.send({ type: 'signal', to: call.peer, call_id: call.id, kind, data })).catch(() => {});
    } catch { /* not connected: the other side's ring times out */ }
  }

  fail(id, e) {
    if (!this.isCurrent(id)) return;
    console.warn('call failed', e);
    this.tell(this.call, 'hangup', { reason: 'error' });
    this.end(`Call failed: ${e && e.message ? e.message : e}`, true);
  }

  end(text, failed) {
    const call = this.call;
    if (!call) return;
    this.call = null;
    this.endedIds.push(call.id);
    if (this.endedIds.length > 20) this.endedIds.shift();
    clearTimeout(call.ringTimer);
    if (call.pc) { try { call.pc.close(); } catch { /* closed */ } }
    stopStream(call.local);
    this.ui.setState(text, failed ? 'failed' : 'ended', { video: call.video });
    this.ui.onEnd();
  }
}

function randomId() {
  const b = new Uint8Array(12);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function stopStream(s) {
  if (s) for (const t of s.getTracks()) t.stop();
}
