// A 1:1 voice/video call over WebRTC. Offer, answer, ICE candidates and hangup travel as
// `signal` frames through the server (`kind`: ring, offer, answer, candidate, hangup);
// media flows peer to peer. No ICE servers: host candidates suffice on one network.

export class Calls {
  /**
   * @param {object} ui { send(frame) -> Promise|void, setState(text, phase), showVideo(local, remote), onEnd() }
   */
  constructor(ui) {
    this.ui = ui;
    this.call = null; // { id, peer, pc, local, role, queued: [], remoteSet, incomingOffer }
  }

  get active() { return this.call !== null; }

  async start(peer, video = true) {
    if (this.call) return;
    const id = 'c-' + randomId();
    this.call = { id, peer, pc: null, local: null, role: 'caller', queued: [], remoteSet: false };
    this.ui.setState(`Calling ${peer}…`, 'calling');
    try {
      await this.ui.send({ type: 'signal', to: peer, call_id: id, kind: 'ring', data: { video } });
      const local = await navigator.mediaDevices.getUserMedia({ audio: true, video });
      if (!this.isCurrent(id)) { stopStream(local); return; }
      this.call.local = local;
      const pc = this.makePeer(id, peer);
      for (const t of local.getTracks()) pc.addTrack(t, local);
      this.ui.showVideo(local, null);
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      await this.ui.send({ type: 'signal', to: peer, call_id: id, kind: 'offer', data: { type: offer.type, sdp: offer.sdp } });
    } catch (e) {
      this.fail(id, e);
    }
  }

  isCurrent(id) { return this.call && this.call.id === id; }

  makePeer(id, peer) {
    const pc = new RTCPeerConnection({ iceServers: [] });
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
      if (s === 'connected') this.ui.setState(`Call connected with ${peer}`, 'connected');
      else if (s === 'connecting') this.ui.setState('Connecting…', 'connecting');
      else if (s === 'failed') this.end('Call failed', true);
      else if (s === 'disconnected') this.ui.setState('Reconnecting call…', 'connecting');
    };
    return pc;
  }

  /** A `signal` frame from the server. */
  async onSignal(f) {
    const { from, call_id: id, kind, data } = f;
    if (kind === 'ring' || kind === 'offer') {
      if (this.call && this.call.id !== id) {
        // Busy: refuse the second call.
        Promise.resolve(this.ui.send({ type: 'signal', to: from, call_id: id, kind: 'hangup', data: { reason: 'busy' } })).catch(() => {});
        return;
      }
      if (!this.call) {
        this.call = { id, peer: from, pc: null, local: null, role: 'callee', queued: [], remoteSet: false, incomingOffer: null };
        this.ui.setState(`Incoming call from ${from}`, 'incoming');
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
        await call.pc.setRemoteDescription({ type: 'answer', sdp: data.sdp });
        call.remoteSet = true;
        await this.flushCandidates();
        // The connection may already be up by now; never step back from "connected".
        if (this.isCurrent(id) && call.pc.connectionState !== 'connected') this.ui.setState('Connecting…', 'connecting');
      } else if (kind === 'candidate') {
        if (call.pc && call.remoteSet) await call.pc.addIceCandidate(data);
        else call.queued.push(data);
      } else if (kind === 'hangup') {
        const why = data && data.reason === 'busy' ? `${call.peer} is busy` : data && data.reason === 'declined' ? `${call.peer} declined` : 'Call ended';
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
    this.ui.setState('Connecting…', 'connecting');
    if (this.call.incomingOffer) await this.answer();
  }

  async answer() {
    const call = this.call;
    const id = call.id;
    if (call.pc) return;
    try {
      const video = true;
      const local = await navigator.mediaDevices.getUserMedia({ audio: true, video });
      if (!this.isCurrent(id)) { stopStream(local); return; }
      call.local = local;
      const pc = this.makePeer(id, call.peer);
      for (const t of local.getTracks()) pc.addTrack(t, local);
      this.ui.showVideo(local, null);
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

  decline() {
    if (!this.call) return;
    this.hangup('declined');
  }

  /** Ends the call and tells the peer. */
  hangup(reason = 'hangup') {
    const call = this.call;
    if (!call) return;
    Promise.resolve(this.ui.send({ type: 'signal', to: call.peer, call_id: call.id, kind: 'hangup', data: { reason } })).catch(() => {});
    this.end('Call ended', false);
  }

  fail(id, e) {
    if (!this.isCurrent(id)) return;
    console.warn('call failed', e);
    const call = this.call;
    Promise.resolve(this.ui.send({ type: 'signal', to: call.peer, call_id: call.id, kind: 'hangup', data: { reason: 'error' } })).catch(() => {});
    this.end(`Call failed: ${e && e.message ? e.message : e}`, true);
  }

  end(text, failed) {
    const call = this.call;
    if (!call) return;
    this.call = null;
    if (call.pc) { try { call.pc.close(); } catch { /* closed */ } }
    stopStream(call.local);
    this.ui.setState(text, failed ? 'failed' : 'ended');
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
