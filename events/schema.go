package events

import (
	"strconv"
	"time"
	"unicode/utf8"
)

// Schema and SchemaVersion name the JSON form of a match (AppendJSON): one
// object per line. The version changes with any change a reader of the
// previous one would misread; fields are only added within a version.
const (
	Schema        = "vasengine-event"
	SchemaVersion = 1
)

// MsgID returns the match's unique id: host, run, VM, the VM's record
// number and the rule, dot-separated. It is the JetStream message id
// (Nats-Msg-Id), so a match published twice is stored once.
func (p *Pipeline) AppendMsgID(dst []byte, m *Match) []byte {
	dst = append(dst, p.host...)
	dst = append(dst, '.')
	dst = append(dst, p.run...)
	dst = append(dst, '.')
	dst = strconv.AppendUint(dst, uint64(m.VM), 10)
	dst = append(dst, '.')
	dst = strconv.AppendUint(dst, m.Seq, 10)
	dst = append(dst, '.')
	return strconv.AppendUint(dst, uint64(m.Rule), 10)
}

// RuleName returns the name of rule i.
func (p *Pipeline) RuleName(i uint16) string {
	if int(i) < len(p.names) {
		return p.names[i]
	}
	return "rule" + strconv.Itoa(int(i))
}

func appendHex(dst []byte, v uint64) []byte {
	dst = append(dst, `"0x`...)
	dst = strconv.AppendUint(dst, v, 16)
	return append(dst, '"')
}

// AppendJSON appends m as one JSON object (schema vasengine-event, version
// 1; README "Events") and a newline to dst.
func (p *Pipeline) AppendJSON(dst []byte, m *Match) []byte {
	root := p.Root(m.Root)
	dst = append(dst, `{"schema":"vasengine-event","version":1,"id":`...)
	dst = appendString(dst, string(p.AppendMsgID(nil, m)))
	dst = append(dst, `,"host":`...)
	dst = appendString(dst, p.host)
	dst = append(dst, `,"vm":`...)
	dst = strconv.AppendUint(dst, uint64(m.VM), 10)
	dst = append(dst, `,"seq":`...)
	dst = strconv.AppendUint(dst, m.Seq, 10)
	dst = append(dst, `,"rule":`...)
	dst = appendString(dst, p.RuleName(m.Rule))
	if rs := p.cfg.Rules; rs != nil {
		dst = append(dst, `,"priority":`...)
		dst = appendString(dst, rs.Priority(m.Rule))
		dst = append(dst, `,"output":`...)
		dst = appendString(dst, string(rs.AppendOutput(nil, m.Rule, &m.Record, &root, p.host)))
	}
	dst = append(dst, `,"root":{"cr3":`...)
	dst = appendHex(dst, m.CR3)
	dst = append(dst, `,"mode":`...)
	dst = appendString(dst, m.Mode.String())
	dst = append(dst, `,"name":`...)
	dst = appendString(dst, root.Name)
	dst = append(dst, `,"full_space":`...)
	dst = strconv.AppendBool(dst, m.Flags&FlagFullSpace != 0)
	dst = append(dst, `},"va":`...)
	dst = appendHex(dst, m.VA)
	dst = append(dst, `,"size":`...)
	dst = strconv.AppendUint(dst, m.Size, 10)
	dst = append(dst, `,"old":`...)
	dst = appendHex(dst, m.Old)
	dst = append(dst, `,"new":`...)
	dst = appendHex(dst, m.New)
	dst = append(dst, `,"kind":"`...)
	dst = append(dst, m.Kind.String()...)
	dst = append(dst, `","perm_old":"`...)
	dst = append(dst, PermOf(m.Old).String()...)
	dst = append(dst, `","perm_new":"`...)
	dst = append(dst, PermOf(m.New).String()...)
	dst = append(dst, `","changes":"`...)
	dst = append(dst, Changes(m.Gained, m.Lost)...)
	dst = append(dst, `","kernel":`...)
	dst = strconv.AppendBool(dst, m.Flags&FlagKernel != 0)
	dst = append(dst, `,"trap_ns":`...)
	dst = strconv.AppendInt(dst, m.Trap, 10)
	dst = append(dst, `,"time_ns":`...)
	dst = strconv.AppendInt(dst, m.Time, 10)
	dst = append(dst, `,"time":"`...)
	dst = time.Unix(0, m.Time).UTC().AppendFormat(dst, time.RFC3339Nano)
	return append(dst, "\"}\n"...)
}

// appendString appends s as a JSON string.
func appendString(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				dst = append(dst, '\\', c)
			case c < 0x20:
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&15])
			default:
				dst = append(dst, c)
			}
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n == 1 {
			dst = append(dst, `\ufffd`...)
		} else {
			dst = append(dst, s[i:i+n]...)
		}
		i += n
	}
	return append(dst, '"')
}
