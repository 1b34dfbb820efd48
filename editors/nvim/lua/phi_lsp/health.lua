--- :checkhealth phi_lsp — the Neovim version, the server binary, and the model's state.
local M = {}

local function server_cmd()
  if vim.fn.has('nvim-0.11') == 1 then
    local ok, config = pcall(function()
      return vim.lsp.config.phi_lsp
    end)
    if ok and config and config.cmd then
      return config.cmd
    end
  end
  return require('phi_lsp').config.cmd
end

function M.check()
  local health = vim.health
  local phi = require('phi_lsp')

  health.start('phi_lsp: Neovim')
  local version = tostring(vim.version())
  if vim.fn.has('nvim-0.10') == 0 then
    health.error('Neovim ' .. version .. ' is too old', { 'phi_lsp needs Neovim 0.10 or newer' })
  else
    local kind = phi.inline_kind()
    if kind == 'native' then
      health.ok('Neovim ' .. version .. ': ghost text from vim.lsp.inline_completion')
    elseif kind == 'plugin' then
      health.ok('Neovim ' .. version .. ": ghost text from phi_lsp's extmarks (native from Neovim 0.12)")
    else
      health.ok('Neovim ' .. version .. ': ghost text off (inline = false): suggestions come in the completion menu')
    end
  end

  health.start('phi_lsp: server binary')
  local cmd = server_cmd()
  if type(cmd) ~= 'table' or type(cmd[1]) ~= 'string' then
    health.info('cmd is a function: not checked')
  else
    local exe = vim.fn.exepath(vim.fn.expand(cmd[1]))
    if exe == '' then
      health.error('`' .. cmd[1] .. '` not found: not an executable file and not on PATH', {
        'build it: `cargo build --release` in the phi-lsp repository',
        "then put target/release on PATH, or: require('phi_lsp').setup({ cmd = { '/path/to/phi-lsp', '--stdio' } })",
      })
    else
      local ok, result = pcall(function()
        return vim.system({ exe, '--version' }, { text = true }):wait(5000)
      end)
      local version_line = ok and result.code == 0 and vim.trim(result.stdout or '') or nil
      if version_line and version_line ~= '' then
        health.ok(('%s (%s)'):format(exe, version_line))
      else
        health.error(exe .. ' does not run: `' .. exe .. ' --version` failed', { 'rebuild it, or point cmd at a working binary' })
      end
    end
  end

  health.start('phi_lsp: model')
  local clients = phi.clients()
  if #clients == 0 then
    health.warn('no phi_lsp client is running, so the model is not checked', {
      'open a Python file (the server starts and loads the model), then run :checkhealth phi_lsp again',
    })
    return
  end
  for _, client in ipairs(clients) do
    local status, err = phi.status(client, 3000)
    if not status then
      health.error(('client %d: %s'):format(client.id, err))
    elseif status.state == 'ready' then
      health.ok(phi.describe(status))
      health.info(('position encoding %s, completions %s%s'):format(
        status.positionEncoding or client.offset_encoding or '?',
        status.completionMode or '?',
        phi.enabled and '' or ' (suggestions turned off: :PhiLsp enable)'
      ))
    elseif status.state == 'loading' then
      health.warn('the model is still loading: ' .. (status.message or ''), { 'wait, then run :checkhealth phi_lsp again' })
    else
      health.error('the model did not load: ' .. (status.message or '?'), {
        "set a Hugging Face model folder: require('phi_lsp').setup({ settings = { model = '/path/to/phi-1' } })",
        'or set $PHI_LSP_MODEL before starting Neovim; :PhiLsp log shows the server log',
      })
    end
  end
end

return M
